#include "lk/kernels/x86/avx2/simd.h"

namespace lk::kernels {
namespace {
struct Loader {
  using Weight = float;
  static void load(const float* p, __m256 (&w)[2]) {
    w[0] = _mm256_loadu_ps(p);
    w[1] = _mm256_loadu_ps(p + 8);
  }
};
}  // namespace

const FormatKernels avx2_f32 = PanelKernels<Avx2Simd, Loader>::table();

}  // namespace lk::kernels
