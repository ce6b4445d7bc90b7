#include "lk/kernels/x86/avx2/simd.h"

namespace lk::kernels {
namespace {
// Columns 0-7 and 8-15 of a row of e8m0 bytes: each byte shifted into an fp32 exponent is
// 2^(e - 127), halved for the doubled values.
inline void e8m0_group_scales(const uint8_t* row, __m256 (&scale)[2]) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row));
  const __m256 half = _mm256_set1_ps(0.5f);
  const __m256i low = _mm256_slli_epi32(_mm256_cvtepu8_epi32(bytes), 23);
  const __m256i high = _mm256_slli_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8)), 23);
  scale[0] = _mm256_mul_ps(_mm256_castsi256_ps(low), half);
  scale[1] = _mm256_mul_ps(_mm256_castsi256_ps(high), half);
}

// MXFP4 blocks lie as INT4's (formats.h): the same two masks and a shift give each 32-bit
// lane one column's four codes, and one vpshufb per half looks each code up as twice its
// value plus 12, an unsigned byte 0..24 that vpmaddubsw multiplies by the 8-bit
// activations as INT4's bytes are. The kernels take the 12 off with the activations' span
// sums, once per group, whose 8 blocks sum whole in 16 bits (kernels.h, activation_max).
struct Unpack {
  static constexpr WeightFormat kFormat = WeightFormat::Mxfp4;
  // Short rows, fetched far ahead into L2 as INT4's are.
  static constexpr int kPrefetchBytes = 6144;
  static constexpr bool kPrefetchIntoL2 = true;
  static constexpr int kQuadBias = 12;
  static constexpr int kQuadMax = 24;
  static void quads(const uint8_t* block, __m256i (&w)[2]) {
    const __m256i codes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block));
    const __m256i table = _mm256_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0,
                                           12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0);
    const __m256i nibble = _mm256_set1_epi8(0x0f);
    w[0] = _mm256_shuffle_epi8(table, _mm256_and_si256(codes, nibble));
    w[1] = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(codes, 4), nibble));
  }
  static void group_scales(const uint8_t* row, __m256 (&scale)[2]) { e8m0_group_scales(row, scale); }
};

// What prefill widens MXFP4 to: each block's looked-up bytes, 64 per block, so that a pass
// only loads them (in-cache, 64 rows: about 0.85x the time of unpacking in every pass).
struct WideUnpack {
  static constexpr WeightFormat kFormat = WeightFormat::Mxfp4;
  static constexpr int kBlockRows = kInt4RowsPerBlock;
  static constexpr int kBlockBytes = 64;
  static constexpr int kQuadBias = Unpack::kQuadBias;
  static constexpr int kQuadMax = Unpack::kQuadMax;
  static void quads(const uint8_t* block, __m256i (&w)[2]) {
    w[0] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block));
    w[1] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 32));
  }
  static void pack(const __m256i (&w)[2], uint8_t* block) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(block), w[0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(block + 32), w[1]);
  }
  static void group_scales(const uint8_t* row, __m256 (&scale)[2]) { e8m0_group_scales(row, scale); }
};
}  // namespace

// Up to two passes (6 rows) unpack in each pass: widening first measured 4-6% slower there.
const FormatKernels avx2_mxfp4 = PanelKernels<Avx2Simd, Unpack>::table<WideUnpack>(7);

}  // namespace lk::kernels
