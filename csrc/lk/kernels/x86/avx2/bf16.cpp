#include "lk/kernels/x86/avx2/simd.h"

namespace lk::kernels {
namespace {
// bf16 is the top half of an fp32: widen each lane and shift it into place.
struct Loader {
  using Weight = uint16_t;
  static __m256 widen8(const uint16_t* p) {
    const __m256i lanes = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(lanes, 16));
  }
  static void load(const uint16_t* p, __m256 (&w)[2]) {
    w[0] = widen8(p);
    w[1] = widen8(p + 8);
  }
};
}  // namespace

const FormatKernels avx2_bf16 = PanelKernels<Avx2Simd, Loader>::table();

}  // namespace lk::kernels
