// AVX-512 INT8 decode, shared by the AVX-512 and AVX-512 VNNI kernel files (each compiles
// it with its own flags, inside its own anonymous namespace).
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
}  // namespace
}  // namespace lk::kernels
