// AVX-512 INT8 and INT4 decodes, shared by the AVX-512 and AVX-512 VNNI kernel files
// (each compiles them with its own flags, inside its own anonymous namespace).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "lk/formats.h"

namespace lk::kernels {
namespace {
// A pair of rows is stored column by column (formats.h): sign-extending its bytes to
// 16 bits gives each column's two weights in one 32-bit lane.
struct Int8Decode {
  static constexpr WeightFormat kFormat = WeightFormat::Int8;
  static void pairs(const uint8_t* block, __m512i (&w)[1][1]) {
    w[0][0] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block)));
  }
};

// Nibbles 0 and 1 of the 16 words are columns 0-7 and 8-15 of rows 0 and 1, nibbles 2 and 3
// those of rows 2 and 3 (formats.h): with the words in both halves of a register, a
// variable shift to the top and an arithmetic one back give a pair of rows for all 16
// columns, sign-extended.
struct Int4Decode {
  static constexpr WeightFormat kFormat = WeightFormat::Int4;
  static void pairs(const uint8_t* block, __m512i (&w)[2][1]) {
    const __m512i words = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block)));
    const __m512i rows01 = _mm512_inserti64x4(_mm512_set1_epi16(12), _mm256_set1_epi16(8), 1);
    const __m512i rows23 = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_setzero_si256(), 1);
    w[0][0] = _mm512_srai_epi16(_mm512_sllv_epi16(words, rows01), 12);
    w[1][0] = _mm512_srai_epi16(_mm512_sllv_epi16(words, rows23), 12);
  }
};
}  // namespace
}  // namespace lk::kernels
