#include "lk/kernels/x86/avx2/simd.h"

namespace lk::kernels {
namespace {
// e4m3fn to fp32 with integer moves: a normal value's exponent and mantissa shift into
// place with the bias raised from 7 to 127; exponent 0 is mantissa * 2^-9. No floating
// point op sees a denormal, so no microcode assists.
struct Decode {
  static constexpr int kRowBytes = kPanelWidth;
  static __m256 widen8(const uint8_t* p) {
    const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(bytes, _mm256_set1_epi32(0x80)), 24);
    const __m256i magnitude = _mm256_and_si256(bytes, _mm256_set1_epi32(0x7f));
    const __m256 normal = _mm256_castsi256_ps(
        _mm256_add_epi32(_mm256_slli_epi32(magnitude, 20), _mm256_set1_epi32(120 << 23)));
    const __m256 subnormal = _mm256_mul_ps(_mm256_cvtepi32_ps(magnitude), _mm256_set1_ps(1.0f / 512.0f));
    const __m256 is_subnormal = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(8), magnitude));
    return _mm256_or_ps(_mm256_blendv_ps(normal, subnormal, is_subnormal), _mm256_castsi256_ps(sign));
  }
  static void values(const uint8_t* row, __m256 (&w)[2]) {
    w[0] = widen8(row);
    w[1] = widen8(row + 8);
  }
};
}  // namespace

const FormatKernels avx2_fp8 = PanelKernels<Avx2Simd, ScaledLoader<Avx2Simd, WeightFormat::Fp8E4M3, Decode>>::table();

}  // namespace lk::kernels
