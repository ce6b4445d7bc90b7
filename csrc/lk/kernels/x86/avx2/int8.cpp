#include "lk/kernels/x86/avx2/simd.h"

namespace lk::kernels {
namespace {
struct Decode {
  static constexpr int kRowBytes = kPanelWidth;
  static __m256 widen8(const uint8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static void values(const uint8_t* row, __m256 (&w)[2]) {
    w[0] = widen8(row);
    w[1] = widen8(row + 8);
  }
};
}  // namespace

const FormatKernels avx2_int8 = PanelKernels<Avx2Simd, ScaledLoader<Avx2Simd, WeightFormat::Int8, Decode>>::table();

}  // namespace lk::kernels
