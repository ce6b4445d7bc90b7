// AVX2 MXFP4 and NVFP4 unpacks: the codes are read alike, the scale bytes differ. Included
// by mxfp4.cpp and nvfp4.cpp, each instantiating them in its own anonymous namespace.
#pragma once

#include "lk/kernels/x86/avx2/simd.h"

namespace lk::kernels {
namespace {
// Columns 0-7 and 8-15 of a row of scale bytes as fp32 scales, each byte shifted into fp32
// bit positions. MXFP4's e8m0 into the exponent is 2^(e - 127), halved for the doubled
// values; NVFP4's scale code (formats.h) is the scale times 2^-104.
template <WeightFormat kFormat>
inline void byte_group_scales(const uint8_t* row, __m256 (&scale)[2]) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row));
  const __m256i low = _mm256_cvtepu8_epi32(bytes), high = _mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8));
  if constexpr (kFormat == WeightFormat::Mxfp4) {
    const __m256 half = _mm256_set1_ps(0.5f);
    scale[0] = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(low, 23)), half);
    scale[1] = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(high, 23)), half);
  } else {
    scale[0] = _mm256_castsi256_ps(_mm256_slli_epi32(low, kNvfp4ScaleCodeShift));
    scale[1] = _mm256_castsi256_ps(_mm256_slli_epi32(high, kNvfp4ScaleCodeShift));
  }
}

// The blocks lie as INT4's (formats.h): the same two masks and a shift give each 32-bit
// lane one column's four codes, and one vpshufb per half looks each code up as twice its
// value plus 12, an unsigned byte 0..24 that vpmaddubsw multiplies by the 8-bit
// activations as INT4's bytes are. The kernels take the 12 off with the activations' span
// sums, once per group, whose blocks sum whole in 16 bits (kernels.h, activation_max).
template <WeightFormat kE2m1Format>
struct E2m1Unpack {
  static constexpr WeightFormat kFormat = kE2m1Format;
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
  static void group_scales(const uint8_t* row, __m256 (&scale)[2]) { byte_group_scales<kFormat>(row, scale); }
};

// What prefill widens them to: each block's looked-up bytes, 64 per block, so that a pass
// only loads them (in-cache, 64 rows: about 0.85x the time of unpacking in every pass).
template <WeightFormat kE2m1Format>
struct E2m1WideUnpack {
  static constexpr WeightFormat kFormat = kE2m1Format;
  static constexpr int kBlockRows = kInt4RowsPerBlock;
  static constexpr int kBlockBytes = 64;
  static constexpr int kQuadBias = E2m1Unpack<kFormat>::kQuadBias;
  static constexpr int kQuadMax = E2m1Unpack<kFormat>::kQuadMax;
  static void quads(const uint8_t* block, __m256i (&w)[2]) {
    w[0] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block));
    w[1] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 32));
  }
  static void pack(const __m256i (&w)[2], uint8_t* block) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(block), w[0]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(block + 32), w[1]);
  }
  static void group_scales(const uint8_t* row, __m256 (&scale)[2]) { byte_group_scales<kFormat>(row, scale); }
};
}  // namespace
}  // namespace lk::kernels
