// One-lane "vector" so the portable fallback reuses the shared panel multiply.
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
  static Vec broadcast(const float* p) { return *p; }
  static Vec fmadd(Vec a, Vec b, Vec c) { return a * b + c; }
  static Vec add(Vec a, Vec b) { return a + b; }
  static Vec load(const float* p) { return *p; }
  static void store(float* p, Vec v) { *p = v; }
  static void prefetch(const void* p) { __builtin_prefetch(p); }
};

template <class Stored, float (*to_float)(Stored)>
struct ScalarLoader {
  using Weight = Stored;
  static void load(const Stored* p, float (&w)[kPanelWidth]) {
    for (int j = 0; j < kPanelWidth; ++j) w[j] = to_float(p[j]);
  }
};

}  // namespace
}  // namespace lk::kernels
