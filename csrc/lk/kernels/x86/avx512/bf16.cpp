#include "lk/kernels/x86/avx512/simd.h"

namespace lk::kernels {
namespace {
// bf16 is the top half of an fp32: widen each lane and shift it into place.
struct Decode {
  static constexpr WeightFormat kFormat = WeightFormat::BF16;
  static void values(const uint8_t* row, __m512 (&w)[1]) {
    const __m512i lanes = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row)));
    w[0] = _mm512_castsi512_ps(_mm512_slli_epi32(lanes, 16));
  }
};
}  // namespace

// Prefill widens float panels to fp32 once: Intel cores run vpmovzxwd on an FMA port.
// Converting in every pass, which wins on AVX2 (see there), is unmeasured here.
const FormatKernels avx512_bf16 = PanelKernels<Avx512Simd, Decode>::table<F32Decode<Avx512Simd>>();

}  // namespace lk::kernels
