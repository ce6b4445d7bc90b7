// AVX512 INT8, INT4, MXFP4 and NVFP4 unpacks, shared by the AVX512, AVX512_VNNI, AVX512_BF16
// and AMX kernel files (each compiles them with its own flags, inside its own anonymous
// namespace).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "lk/formats.h"

namespace lk::kernels {
namespace {
// A pair of rows is stored column by column (formats.h): sign-extending its bytes to
// 16 bits gives each column's two weights in one 32-bit lane.
struct Int8Unpack {
  static constexpr WeightFormat kFormat = WeightFormat::Int8;
  // Fetched ahead into L2 only (prefetcht2), as far as Int4Unpack explains.
  static constexpr int kPrefetchBytes = 16384;
  static constexpr bool kPrefetchIntoL2 = true;
  static void pairs(const uint8_t* block, __m512i (&w)[1][1]) {
    w[0][0] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block)));
  }
};

// A block's 32 bytes in both halves of a register (a broadcast load, no shuffle), the upper
// half's 16-bit words shifted right by 4: each byte's low nibble in the lower half and its
// high nibble in the upper half, in bits 0-3 (bits 4-7 are for the caller to mask).
inline __m512i nibble_halves(const uint8_t* block) {
  const __m512i both = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block)));
  return _mm512_mask_srli_epi16(both, static_cast<__mmask32>(0xffff0000u), both, 4);
}

// Read as bytes, 32-bit lane j < 8 of a block holds four rows of columns j (low nibbles)
// and j + 8 (high nibbles) (formats.h): the low nibbles in the lower half of a register and
// the high ones in the upper half give every column's four rows as unsigned bytes, which
// the kernels multiply by 8-bit activations (vpmaddubsw; vpdpbusd with VNNI), 64 products
// per instruction where sign-extended 16-bit pairs took 32.
struct Int4Unpack {
  static constexpr WeightFormat kFormat = WeightFormat::Int4;
  // Stored values are q - 8 as 4-bit two's complement: flipping bit 3 of each nibble gives q.
  static constexpr int kQuadBias = 8;
  // A fetch into L1 holds one of the L1's few miss buffers for a whole DRAM latency, which
  // caps the bytes in flight; one fetched into L2 only (prefetcht2) does not. bf16 and FP8
  // keep L1 (see git log -p BENCHMARKS.md, "Kernels"). 16 KB ahead, about a 2048-deep panel per stream,
  // was the fastest distance out of cache (Zen 4).
  static constexpr int kPrefetchBytes = 16384;
  static constexpr bool kPrefetchIntoL2 = true;
  static void quads(const uint8_t* block, __m512i (&w)[1]) {
    // (x & 0x0f) ^ 0x08 in one vpternlog (A & C) ^ B.
    w[0] = _mm512_ternarylogic_epi32(nibble_halves(block), _mm512_set1_epi8(0x08), _mm512_set1_epi8(0x0f), 0x6c);
  }
};

// MXFP4 and NVFP4 blocks lie as INT4's (formats.h): the same halves, then one vpshufb (vpermb
// where the file is built for AVX512_VBMI) looks each code up as twice its value plus 12, an
// unsigned byte 0..24 (x86/avx2/e2m1_unpack.h), multiplied as INT4's bytes are (vpmaddubsw, a
// group's blocks in one run; vpdpbusd).
template <WeightFormat kE2m1Format>
struct E2m1Unpack {
  static constexpr WeightFormat kFormat = kE2m1Format;
  static constexpr int kQuadBias = 12;
  static constexpr int kQuadMax = 24;
  // Fetched as INT4's panels are.
  static constexpr int kPrefetchBytes = Int4Unpack::kPrefetchBytes;
  static constexpr bool kPrefetchIntoL2 = true;
  static void quads(const uint8_t* block, __m512i (&w)[1]) {
    const __m512i table =
        _mm512_broadcast_i32x4(_mm_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0));
#if defined(__AVX512VBMI__)
    // vpermb reads 6 bits of each index: with the table four times over, bits 4-5 need no mask.
    w[0] = _mm512_permutexvar_epi8(nibble_halves(block), table);
#else
    w[0] = _mm512_shuffle_epi8(table, _mm512_and_si512(nibble_halves(block), _mm512_set1_epi8(0x0f)));
#endif
  }
  // A row of scale bytes, one per column, each shifted into fp32 bit positions. MXFP4's e8m0
  // into the exponent is 2^(e - 127), halved for the doubled values; NVFP4's scale code
  // (formats.h) is the scale times 2^-104.
  static void group_scales(const uint8_t* row, __m512 (&scale)[1]) {
    const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row)));
    if constexpr (kE2m1Format == WeightFormat::Mxfp4) {
      scale[0] = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(bytes, 23)), _mm512_set1_ps(0.5f));
    } else {
      scale[0] = _mm512_castsi512_ps(_mm512_slli_epi32(bytes, kNvfp4ScaleCodeShift));
    }
  }
};
using Mxfp4Unpack = E2m1Unpack<WeightFormat::Mxfp4>;
using Nvfp4Unpack = E2m1Unpack<WeightFormat::Nvfp4>;
}  // namespace
}  // namespace lk::kernels
