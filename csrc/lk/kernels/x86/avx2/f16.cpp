#include "lk/kernels/x86/avx2/simd.h"

namespace lk::kernels {
namespace {
struct Loader {
  using Weight = uint16_t;
  static void load(const uint16_t* p, __m256 (&w)[2]) {
    w[0] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    w[1] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  }
};
}  // namespace

const FormatKernels avx2_f16 = PanelKernels<Avx2Simd, Loader>::table();

}  // namespace lk::kernels
