// AVX512_VNNI: vpdpwssd adds a lane's two 16-bit products to its 32-bit sum in one
// instruction, where AVX512F spends vpmaddwd and vpaddd (and vpdpbusd INT4's four byte
// products). The sums are the same bits (both wrap modulo 2^32; the engine's spans keep
// them far from it), so VNNI changes only the integer formats' speed.
#pragma once

#include <immintrin.h>

#include "lk/kernels/x86/avx512/simd.h"

namespace lk::kernels {
namespace {

struct Avx512VnniSimd : Avx512Simd {
  // dot_add and quad_dot_add are one instruction each, so a sum's chain runs at its latency
  // (panel_gemm.h's integer_sets splits it).
  static constexpr bool kFusedDotAdd = true;
  static IVec dot_add(IVec acc, IVec w, IVec x) { return _mm512_dpwssd_epi32(acc, w, x); }
  static IVec quad_dot_add(IVec acc, IVec w, IVec x) { return _mm512_dpbusd_epi32(acc, w, x); }
};

}  // namespace
}  // namespace lk::kernels
