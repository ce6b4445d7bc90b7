#include "lk/kernels/x86/avx512/simd.h"

namespace lk::kernels {
namespace {
struct Decode {
  static constexpr int kRowBytes = kPanelWidth;
  static void values(const uint8_t* row, __m512 (&w)[1]) {
    w[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row))));
  }
};
}  // namespace

const FormatKernels avx512_int8 = PanelKernels<Avx512Simd, ScaledLoader<Avx512Simd, WeightFormat::Int8, Decode>>::table();

}  // namespace lk::kernels
