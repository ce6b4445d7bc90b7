#include "lk/kernels/x86/avx2/simd.h"

namespace lk::kernels {
namespace {
// Low nibbles are columns 0-7, high nibbles columns 8-15 (formats.h).
struct Decode {
  static constexpr int kRowBytes = kInt4BytesPerRow;
  static void values(const uint8_t* row, __m256 (&w)[2]) {
    const __m128i packed = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row));
    const __m128i nibble = _mm_set1_epi8(0x0f);
    const __m128i low = _mm_and_si128(packed, nibble);
    const __m128i high = _mm_and_si128(_mm_srli_epi16(packed, 4), nibble);
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(low));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(high));
  }
};
}  // namespace

const FormatKernels avx2_int4 = PanelKernels<Avx2Simd, ScaledLoader<Avx2Simd, WeightFormat::Int4, Decode>>::table();

}  // namespace lk::kernels
