// AVX-512F: 16 fp32 lanes (one vector per panel row), 32 zmm registers (24 accumulators).
#pragma once

#include <immintrin.h>

#include "lk/kernels/panel_gemm.h"

namespace lk::kernels {
namespace {

struct Avx512Simd {
  using Vec = __m512;
  static constexpr int kLanes = 16;
  static constexpr int kAccumulators = 24;
  static constexpr int kMainRows = 12;
  static Vec zero() { return _mm512_setzero_ps(); }
  static Vec set1(float value) { return _mm512_set1_ps(value); }
  static Vec broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static Vec add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  static Vec mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
  static Vec load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
};

}  // namespace
}  // namespace lk::kernels
