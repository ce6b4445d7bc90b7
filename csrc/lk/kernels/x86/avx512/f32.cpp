#include "lk/kernels/x86/avx512/simd.h"

namespace lk::kernels {
namespace {
struct Loader {
  using Weight = float;
  static void load(const float* p, __m512 (&w)[1]) { w[0] = _mm512_loadu_ps(p); }
};
}  // namespace

const FormatKernels avx512_f32 = PanelKernels<Avx512Simd, Loader>::table();

}  // namespace lk::kernels
