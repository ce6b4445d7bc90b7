#include "lk/kernels/x86/avx512/simd.h"

namespace lk::kernels {
namespace {
// A pair of rows is stored column by column (formats.h): sign-extending its bytes to
// 16 bits gives each column's two weights in one 32-bit lane.
struct Decode {
  static constexpr WeightFormat kFormat = WeightFormat::Int8;
  static void pairs(const uint8_t* block, __m512i (&w)[1][1]) {
    w[0][0] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block)));
  }
};
}  // namespace

const FormatKernels avx512_int8 = PanelKernels<Avx512Simd, Decode>::table();

}  // namespace lk::kernels
