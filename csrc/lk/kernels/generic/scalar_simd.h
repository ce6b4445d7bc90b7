// One-lane "vector" so the portable fallback reuses the shared panel multiply and loaders.
#pragma once

#include "lk/kernels/panel_gemm.h"

namespace lk::kernels {
namespace {

struct ScalarSimd {
  using Vec = float;
  static constexpr int kLanes = 1;
  static constexpr int kAccumulators = 32;
  static constexpr int kMainRows = 2;
  static Vec zero() { return 0.0f; }
  static Vec set1(float value) { return value; }
  static Vec broadcast(const float* p) { return *p; }
  static Vec fmadd(Vec a, Vec b, Vec c) { return a * b + c; }
  static Vec mul(Vec a, Vec b) { return a * b; }
  static Vec add(Vec a, Vec b) { return a + b; }
  static Vec load(const float* p) { return *p; }
  static void store(float* p, Vec v) { *p = v; }
  static void prefetch(const void* p) { __builtin_prefetch(p); }
};

// Decodes rows whose kPanelWidth elements are each converted by `to_float`.
template <class Stored, float (*to_float)(Stored)>
struct ScalarDecode {
  static constexpr int kRowBytes = kPanelWidth * sizeof(Stored);
  static void values(const uint8_t* row, float (&w)[kPanelWidth]) {
    Stored stored[kPanelWidth];
    __builtin_memcpy(stored, row, sizeof stored);
    for (int j = 0; j < kPanelWidth; ++j) w[j] = to_float(stored[j]);
  }
};

}  // namespace
}  // namespace lk::kernels
