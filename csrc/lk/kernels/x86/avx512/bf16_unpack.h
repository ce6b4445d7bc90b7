// The AVX512 bf16 unpack, shared by the AVX512, AVX512_BF16 and AMX kernel files (each
// compiles it with its own flags, inside its own anonymous namespace).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "lk/formats.h"

namespace lk::kernels {
namespace {
// bf16 is the top half of an fp32: widen each lane and shift it into place.
struct Bf16Unpack {
  static constexpr WeightFormat kFormat = WeightFormat::BF16;
  static void values(const uint8_t* row, __m512 (&w)[1]) {
    const __m512i lanes = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row)));
    w[0] = _mm512_castsi512_ps(_mm512_slli_epi32(lanes, 16));
  }
};
}  // namespace
}  // namespace lk::kernels
