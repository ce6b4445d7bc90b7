#include "lk/kernels/x86/avx512/simd.h"

namespace lk::kernels {
namespace {
struct Unpack {
  static constexpr WeightFormat kFormat = WeightFormat::F16;
  static void values(const uint8_t* row, __m512 (&w)[1]) {
    w[0] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row)));
  }
};
}  // namespace

// Prefill widens to fp32 once, as bf16 does.
const FormatKernels avx512_f16 = PanelKernels<Avx512Simd, Unpack>::table<F32Unpack<Avx512Simd, Unpack>>();

}  // namespace lk::kernels
