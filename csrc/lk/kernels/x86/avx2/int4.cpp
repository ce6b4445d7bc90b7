#include "lk/kernels/x86/avx2/simd.h"

namespace lk::kernels {
namespace {
// Nibble s of every 16-bit word holds one column half of a row pair (formats.h): shifting
// it to the top and back, arithmetically, unpacks it sign-extended, four rows of 16 columns
// from one 32-byte load.
struct Decode {
  static constexpr WeightFormat kFormat = WeightFormat::Int4;
  static void pairs(const uint8_t* block, __m256i (&w)[2][2]) {
    const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block));
    w[0][0] = _mm256_srai_epi16(_mm256_slli_epi16(words, 12), 12);
    w[0][1] = _mm256_srai_epi16(_mm256_slli_epi16(words, 8), 12);
    w[1][0] = _mm256_srai_epi16(_mm256_slli_epi16(words, 4), 12);
    w[1][1] = _mm256_srai_epi16(words, 12);
  }
};
}  // namespace

const FormatKernels avx2_int4 = PanelKernels<Avx2Simd, Decode>::table();

}  // namespace lk::kernels
