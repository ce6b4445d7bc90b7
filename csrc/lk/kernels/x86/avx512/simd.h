// AVX512F: 16 fp32 lanes (one vector per panel row), 32 zmm registers (24 accumulators).
#pragma once

#include <immintrin.h>

#include <cstring>

#include "lk/kernels/panel_gemm.h"

namespace lk::kernels {
namespace {

struct Avx512Simd {
  using Vec = __m512;
  static constexpr int kLanes = 16;
  static constexpr int kRegisters = 32;
  static constexpr int kAccumulators = 24;
  // Passes of 8 rows: more leave too few registers for the unpacked weights, fewer re-read
  // the weights more often (see git log -p BENCHMARKS.md, "Kernels").
  static constexpr int kMainRows = 8;
  static constexpr int kIntegerMainRows = 8;
  // Decode reads two panels side by side (gemm_pair, up to pair_rows() = 8 rows): two
  // streams in flight per thread, which whole layers gain from (see BENCHMARKS.md, "MoE layer").
  static constexpr bool kPairPanels = true;
  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec set1(float value) { return _mm512_set1_ps(value); }
  static Vec broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  static Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
  static void prefetch_into_l2(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T2); }

  // 32-bit lanes holding two 16-bit values (integer formats) or their 32-bit sums. The
  // AVX512_VNNI level fuses dot_add (x86/avx512_vnni).
  using IVec = __m512i;
  static IVec broadcast_pair(const int16_t* p) {
    int pair;
    std::memcpy(&pair, p, sizeof pair);
    return _mm512_set1_epi32(pair);
  }
  static IVec dot_add(IVec acc, IVec w, IVec x) { return _mm512_add_epi32(acc, _mm512_madd_epi16(w, x)); }
  static Vec to_float(IVec v) { return _mm512_cvtepi32_ps(v); }
  static IVec iset1(int value) { return _mm512_set1_epi32(value); }
  static IVec iadd(IVec a, IVec b) { return _mm512_add_epi32(a, b); }
  // INT4's bytes, as AVX2 multiplies them (x86/avx2/simd.h); VNNI fuses the three.
  static IVec broadcast_quad(const int8_t* p) {
    int quad;
    std::memcpy(&quad, p, sizeof quad);
    return _mm512_set1_epi32(quad);
  }
  static IVec quad_products(IVec w, IVec x) { return _mm512_maddubs_epi16(w, x); }
  static IVec add_quad_products(IVec t, IVec w, IVec x) { return _mm512_add_epi16(t, _mm512_maddubs_epi16(w, x)); }
  static IVec widen_add(IVec acc, IVec t) { return _mm512_add_epi32(acc, _mm512_madd_epi16(t, _mm512_set1_epi16(1))); }
};

}  // namespace
}  // namespace lk::kernels
