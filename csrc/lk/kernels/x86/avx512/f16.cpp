#include "lk/kernels/x86/avx512/simd.h"

namespace lk::kernels {
namespace {
struct Loader {
  using Weight = uint16_t;
  static void load(const uint16_t* p, __m512 (&w)[1]) {
    w[0] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
};
}  // namespace

const FormatKernels avx512_f16 = PanelKernels<Avx512Simd, Loader>::table();

}  // namespace lk::kernels
