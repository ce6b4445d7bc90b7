#include "lk/kernels/x86/avx2/simd.h"

namespace lk::kernels {
namespace {
struct Unpack {
  static constexpr WeightFormat kFormat = WeightFormat::F16;
  static void values(const uint8_t* row, __m256 (&w)[2]) {
    w[0] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row)));
    w[1] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16)));
  }
};
}  // namespace

const FormatKernels avx2_f16 = PanelKernels<Avx2Simd, Unpack>::table();

}  // namespace lk::kernels
