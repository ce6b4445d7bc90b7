#include "lk/kernels/x86/avx2/simd.h"

namespace lk::kernels {
namespace {
// e4m3fn bits moved into fp16 bit positions (exponent and mantissa one bit lower, sign in
// place) read as fp16 are the value times 2^-8, e4m3 subnormals included; F16C converts
// them. Five integer ops and two conversions for 16 weights.
struct Decode {
  static constexpr WeightFormat kFormat = WeightFormat::Fp8E4M3;
  static constexpr float kValueScale = 1.0f / 256.0f;
  static void values(const uint8_t* row, __m256 (&w)[2]) {
    const __m256i words = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row)));
    // byte << 8 puts the sign on bit 15; an arithmetic shift right by one moves exponent and
    // mantissa into place and copies the sign into bit 14, which the mask clears.
    const __m256i half = _mm256_and_si256(_mm256_srai_epi16(_mm256_slli_epi16(words, 8), 1),
                                          _mm256_set1_epi16(static_cast<short>(0xbfff)));
    w[0] = _mm256_cvtph_ps(_mm256_castsi256_si128(half));
    w[1] = _mm256_cvtph_ps(_mm256_extracti128_si256(half, 1));
  }
};
}  // namespace

const FormatKernels avx2_fp8 = PanelKernels<Avx2Simd, Decode>::table();

}  // namespace lk::kernels
