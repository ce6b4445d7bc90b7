// The AVX512 FP8 unpack, shared by the AVX512, AVX512_BF16 and AMX kernel files (each
// compiles it with its own flags, inside its own anonymous namespace).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "lk/formats.h"

namespace lk::kernels {
namespace {
// e4m3fn bits moved into fp16 bit positions read as fp16 are the value times 2^-8: each
// byte sign-extended to 16 bits and shifted left by 7 puts exponent and mantissa in place
// and the sign in bit 15, and the mask clears the sign's copy in bit 14: one op fewer per
// row than zero extension, a shift by 8 and an arithmetic one back.
struct Fp8Unpack {
  static constexpr WeightFormat kFormat = WeightFormat::Fp8E4M3;
  static constexpr float kValueScale = 1.0f / 256.0f;
  static void values(const uint8_t* row, __m512 (&w)[1]) {
    const __m256i words = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row)));
    const __m256i half = _mm256_and_si256(_mm256_slli_epi16(words, 7), _mm256_set1_epi16(static_cast<short>(0xbfff)));
    w[0] = _mm512_cvtph_ps(half);
  }
};
}  // namespace
}  // namespace lk::kernels
