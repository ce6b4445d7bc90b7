#include "lk/kernels/x86/avx2/simd.h"

namespace lk::kernels {
namespace {
// bf16 is the top half of an fp32: widen each lane and shift it into place.
struct Decode {
  static constexpr WeightFormat kFormat = WeightFormat::BF16;
  static __m256 widen8(const uint8_t* p) {
    const __m256i lanes = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(lanes, 16));
  }
  static void values(const uint8_t* row, __m256 (&w)[2]) {
    w[0] = widen8(row);
    w[1] = widen8(row + 16);
  }
};
}  // namespace

const FormatKernels avx2_bf16 = PanelKernels<Avx2Simd, Decode>::table();

}  // namespace lk::kernels
