// AVX2 + FMA: 8 fp32 lanes, 16 ymm registers (12 hold accumulators).
#pragma once

#include <immintrin.h>

#include <cstring>

#include "lk/kernels/panel_gemm.h"

namespace lk::kernels {
namespace {

struct Avx2Simd {
  using Vec = __m256;
  static constexpr int kLanes = 8;
  static constexpr int kRegisters = 16;
  static constexpr int kAccumulators = 12;
  static constexpr int kMainRows = 6;
  // INT8/INT4 prefill passes take 3 rows: at 6, GCC keeps two blocks' unpacked weights and
  // broadcasts live beside the 12 accumulators and spills.
  static constexpr int kIntegerMainRows = 3;
  // Decode reads an expert's gate and up panels side by side (FormatKernels::gemm_pair): two
  // streams in flight per thread. Down panels are paired too (MoEEngine::down).
  static constexpr bool kPairPanels = true;
  // How far ahead decode fetches panels: nearer, the stream stalls; farther, fetches evict
  // lines still to be read (see git log -p BENCHMARKS.md, "Kernels"). FP8 and INT4 set their own.
  static constexpr int kPrefetchBytes = 1024;
  static Vec zero() { return _mm256_setzero_ps(); }
  static Vec set1(float value) { return _mm256_set1_ps(value); }
  static Vec broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static Vec add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
  static Vec mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
  static Vec load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
  static void prefetch_into_l2(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T2); }

  // 32-bit lanes holding two 16-bit values (integer formats) or their 32-bit sums.
  using IVec = __m256i;
  static IVec broadcast_pair(const int16_t* p) {
    int pair;
    std::memcpy(&pair, p, sizeof pair);
    return _mm256_set1_epi32(pair);
  }
  static IVec dot_add(IVec acc, IVec w, IVec x) { return _mm256_add_epi32(acc, _mm256_madd_epi16(w, x)); }
  static Vec to_float(IVec v) { return _mm256_cvtepi32_ps(v); }
  static IVec iset1(int value) { return _mm256_set1_epi32(value); }
  static IVec iadd(IVec a, IVec b) { return _mm256_add_epi32(a, b); }
  // Four activation bytes; each lane's four unsigned weight bytes times them, summed in
  // pairs to 16 bits by vpmaddubsw (saturating, but 4-bit weights and 8-bit activations
  // reach 2 * 15 * 127 at most); and such 16-bit sums added into 32-bit lanes (vpmaddwd
  // by ones adds each pair).
  static IVec broadcast_quad(const int8_t* p) {
    int quad;
    std::memcpy(&quad, p, sizeof quad);
    return _mm256_set1_epi32(quad);
  }
  static IVec quad_products(IVec w, IVec x) { return _mm256_maddubs_epi16(w, x); }
  static IVec add_quad_products(IVec t, IVec w, IVec x) { return _mm256_add_epi16(t, _mm256_maddubs_epi16(w, x)); }
  static IVec widen_add(IVec acc, IVec t) { return _mm256_add_epi32(acc, _mm256_madd_epi16(t, _mm256_set1_epi16(1))); }
};

// Unpacks that split a row's 16 columns by parity, w[0] holding columns 0, 2, ..., 14 and
// w[1] columns 1, 3, ..., 15 (where one 32-bit lane holds two of the row's weights), use
// this as their to_column_order (panel_gemm.h).
inline void even_odd_to_column_order(__m256 (&w)[2]) {
  const __m256 low = _mm256_unpacklo_ps(w[0], w[1]);   // columns 0-3 | 8-11
  const __m256 high = _mm256_unpackhi_ps(w[0], w[1]);  // columns 4-7 | 12-15
  w[0] = _mm256_permute2f128_ps(low, high, 0x20);
  w[1] = _mm256_permute2f128_ps(low, high, 0x31);
}

}  // namespace
}  // namespace lk::kernels
