#include "lk/kernels/x86/avx512/simd.h"

namespace lk::kernels {
namespace {
// e4m3fn to fp32 with integer moves (see the AVX2 version): no denormal reaches an FP op.
struct Decode {
  static constexpr int kRowBytes = kPanelWidth;
  static void values(const uint8_t* row, __m512 (&w)[1]) {
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row)));
    const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(bytes, _mm512_set1_epi32(0x80)), 24);
    const __m512i magnitude = _mm512_and_si512(bytes, _mm512_set1_epi32(0x7f));
    const __m512 normal = _mm512_castsi512_ps(
        _mm512_add_epi32(_mm512_slli_epi32(magnitude, 20), _mm512_set1_epi32(120 << 23)));
    const __m512 subnormal = _mm512_mul_ps(_mm512_cvtepi32_ps(magnitude), _mm512_set1_ps(1.0f / 512.0f));
    const __mmask16 is_subnormal = _mm512_cmplt_epi32_mask(magnitude, _mm512_set1_epi32(8));
    const __m512 value = _mm512_mask_blend_ps(is_subnormal, normal, subnormal);
    w[0] = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(value), sign));
  }
};
}  // namespace

const FormatKernels avx512_fp8 = PanelKernels<Avx512Simd, ScaledLoader<Avx512Simd, WeightFormat::Fp8E4M3, Decode>>::table();

}  // namespace lk::kernels
