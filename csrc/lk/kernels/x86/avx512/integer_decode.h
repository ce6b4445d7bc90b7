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
  // Fetched ahead into L2 only (prefetcht2), as Int4Decode explains.
  static constexpr int kPrefetchBytes = 4096;
  static constexpr bool kPrefetchIntoL2 = true;
  static void pairs(const uint8_t* block, __m512i (&w)[1][1]) {
    w[0][0] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block)));
  }
};

// Read as bytes, 32-bit lane j < 8 of a block holds four rows of columns j (low nibbles)
// and j + 8 (high nibbles) (formats.h): the low nibbles in the lower half of a register and
// the high ones in the upper half give every column's four rows as unsigned bytes, which
// the kernels multiply by 8-bit activations (vpmaddubsw; vpdpbusd with VNNI), 64 products
// per instruction where sign-extended 16-bit pairs took 32.
struct Int4Decode {
  static constexpr WeightFormat kFormat = WeightFormat::Int4;
  // Stored values are q - 8 as 4-bit two's complement: flipping bit 3 of each nibble gives q.
  static constexpr int kQuadBias = 8;
  // A fetch into L1 holds one of the L1's few miss buffers for a whole DRAM latency, which
  // caps the bytes in flight; one fetched into L2 only (prefetcht2) does not. bf16 and FP8
  // keep L1 (see BENCHMARKS.md, "Kernels").
  static constexpr int kPrefetchBytes = 6144;
  static constexpr bool kPrefetchIntoL2 = true;
  static void quads(const uint8_t* block, __m512i (&w)[1]) {
    const __m256i words = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block)),
                                           _mm256_set1_epi8(static_cast<char>(0x88)));
    const __m512i halves = _mm512_inserti64x4(_mm512_castsi256_si512(words), _mm256_srli_epi16(words, 4), 1);
    w[0] = _mm512_and_si512(halves, _mm512_set1_epi8(0x0f));
  }
};
}  // namespace
}  // namespace lk::kernels
