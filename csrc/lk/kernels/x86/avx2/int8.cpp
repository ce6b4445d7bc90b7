#include "lk/kernels/x86/avx2/simd.h"

namespace lk::kernels {
namespace {
// A pair of rows is stored column by column (formats.h): sign-extending its bytes to
// 16 bits gives each column's two weights in one 32-bit lane.
struct Decode {
  static constexpr WeightFormat kFormat = WeightFormat::Int8;
  static __m256i widen8(const uint8_t* p) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static void pairs(const uint8_t* block, __m256i (&w)[1][2]) {
    w[0][0] = widen8(block);
    w[0][1] = widen8(block + 16);
  }
};
}  // namespace

const FormatKernels avx2_int8 = PanelKernels<Avx2Simd, Decode>::table();

}  // namespace lk::kernels
