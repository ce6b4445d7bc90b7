// The panel multiply shared by every ISA. `Simd` supplies the vector type and its few
// operations; `Loader` turns kPanelWidth stored weights into fp32 vectors. Instantiate it
// only inside an anonymous namespace of an ISA's own file: each file is compiled with its
// own target flags, and the instantiations must not be merged across files.
#pragma once

#include "lk/kernels/kernels.h"

namespace lk::kernels {

template <class Simd, class Loader>
struct PanelKernels {
  using Vec = typename Simd::Vec;
  using Weight = typename Loader::Weight;
  static constexpr int kVecs = kPanelWidth / Simd::kLanes;
  // Rows ahead the hardware is asked to fetch while streaming a panel in decode.
  static constexpr int kPrefetchRows = 32;

  // Few rows leave most accumulators idle; splitting k over several accumulator sets hides
  // the FMA latency that a single dependency chain per output vector would expose.
  template <int Rows>
  static constexpr int k_unroll() {
    constexpr int sets = Simd::kAccumulators / (Rows * kVecs);
    return sets < 1 ? 1 : (sets > 4 ? 4 : sets);
  }

  template <int Rows>
  static inline void step(Vec (&acc)[Rows][kVecs], const float* const* a, const Weight* panel,
                          int k) {
    Vec w[kVecs];
    Loader::load(panel + static_cast<long>(k) * kPanelWidth, w);
#pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r) {
      const Vec b = Simd::broadcast(a[r] + k);
#pragma GCC unroll 16
      for (int v = 0; v < kVecs; ++v) acc[r][v] = Simd::fmadd(b, w[v], acc[r][v]);
    }
  }

  template <int Rows>
  static void tile(const float* const* a, const Weight* panel, int depth, float* const* c,
                   bool accumulate) {
    constexpr int kSets = k_unroll<Rows>();
    Vec acc[kSets][Rows][kVecs];
#pragma GCC unroll 4
    for (int s = 0; s < kSets; ++s)
#pragma GCC unroll 16
      for (int r = 0; r < Rows; ++r)
#pragma GCC unroll 16
        for (int v = 0; v < kVecs; ++v) acc[s][r][v] = Simd::zero();
    int k = 0;
    for (; k + kSets <= depth; k += kSets) {
      Simd::prefetch(panel + static_cast<long>(k + kPrefetchRows) * kPanelWidth);
#pragma GCC unroll 4
      for (int s = 0; s < kSets; ++s) step<Rows>(acc[s], a, panel, k + s);
    }
    for (; k < depth; ++k) step<Rows>(acc[0], a, panel, k);
#pragma GCC unroll 4
    for (int s = 1; s < kSets; ++s)
#pragma GCC unroll 16
      for (int r = 0; r < Rows; ++r)
#pragma GCC unroll 16
        for (int v = 0; v < kVecs; ++v) acc[0][r][v] = Simd::add(acc[0][r][v], acc[s][r][v]);
#pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r) {
#pragma GCC unroll 16
      for (int v = 0; v < kVecs; ++v) {
        float* out = c[r] + v * Simd::kLanes;
        Simd::store(out, accumulate ? Simd::add(acc[0][r][v], Simd::load(out)) : acc[0][r][v]);
      }
    }
  }

  template <int Rows>
  static void tail(const float* const* a, int rows, const Weight* panel, int depth,
                   float* const* c, bool accumulate) {
    if constexpr (Rows > 0) {
      if (rows == Rows) {
        tile<Rows>(a, panel, depth, c, accumulate);
      } else {
        tail<Rows - 1>(a, rows, panel, depth, c, accumulate);
      }
    }
  }

  static void gemm(const float* const* a, int rows, const void* panel_bytes, int depth,
                   float* const* c, bool accumulate) {
    const Weight* panel = static_cast<const Weight*>(panel_bytes);
    constexpr int kRows = Simd::kMainRows;
    int r = 0;
    for (; r + kRows <= rows; r += kRows) tile<kRows>(a + r, panel, depth, c + r, accumulate);
    tail<kRows - 1>(a + r, rows - r, panel, depth, c + r, accumulate);
  }

  static void widen(const void* panel_bytes, int depth, float* out) {
    const Weight* panel = static_cast<const Weight*>(panel_bytes);
    for (long k = 0; k < depth; ++k) {
      Vec w[kVecs];
      Loader::load(panel + k * kPanelWidth, w);
#pragma GCC unroll 16
      for (int v = 0; v < kVecs; ++v) Simd::store(out + k * kPanelWidth + v * Simd::kLanes, w[v]);
    }
  }

  static constexpr FormatKernels table() { return FormatKernels{&gemm, &widen}; }
};

}  // namespace lk::kernels
