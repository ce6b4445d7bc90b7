// The panel multiply shared by every ISA and format. `Simd` supplies the vector type and its
// few operations; `Loader` turns one stored panel row into kPanelWidth fp32 weights, given
// the scales of its group (grouped formats) loaded once per group. Instantiate it only inside
// an anonymous namespace of an ISA's own file: each file is compiled with its own target
// flags, and the instantiations must not be merged across files.
#pragma once

#include <cstdint>

#include "lk/kernels/kernels.h"

namespace lk::kernels {
namespace {

// A Decode (one per ISA x format file) turns a stored row into kPanelWidth floats:
//   static constexpr int kRowBytes;
//   static void values(const uint8_t* row, Simd::Vec (&w)[kPanelWidth / Simd::kLanes]);
// The loaders below add the per-group scale and offset of grouped formats. A grouped
// Decode may produce its values times a constant (static constexpr float kValueScale: the
// true value is what it produces divided by that) when that saves work per weight; the
// loader folds the constant into the group's scales.

template <class Simd, class Decode>
struct PlainLoader {
  static constexpr bool kGrouped = false;
  static constexpr int kRowBytes = Decode::kRowBytes;
  struct Group {};
  static Group group(const uint8_t*, int, int, int) { return {}; }
  template <int N>
  static void load(const uint8_t* panel, int k, const Group&, typename Simd::Vec (&w)[N]) {
    Decode::values(panel + static_cast<long>(k) * kRowBytes, w);
  }
};

template <class Simd, WeightFormat kFormat, class Decode>
struct ScaledLoader {
  static constexpr bool kGrouped = true;
  static constexpr int kRowBytes = Decode::kRowBytes;
  static constexpr int kVecs = kPanelWidth / Simd::kLanes;
  struct Group {
    typename Simd::Vec scale[kVecs];
    typename Simd::Vec offset[kVecs];
  };
  static Group group(const uint8_t* panel, int depth, int group_size, int index) {
    Group group;
    const float* scales = reinterpret_cast<const float*>(panel + panel_value_bytes(kFormat, depth)) +
                          static_cast<long>(index) * kPanelWidth;
    const float* offsets = scales + static_cast<long>(panel_groups(depth, group_size)) * kPanelWidth;
    for (int v = 0; v < kVecs; ++v) {
      group.scale[v] = Simd::mul(Simd::load(scales + v * Simd::kLanes), Simd::set1(value_scale()));
      group.offset[v] = has_offsets(kFormat) ? Simd::load(offsets + v * Simd::kLanes) : Simd::zero();
    }
    return group;
  }
  static constexpr float value_scale() {
    if constexpr (requires { Decode::kValueScale; }) {
      return 1.0f / Decode::kValueScale;
    } else {
      return 1.0f;
    }
  }
  static void load(const uint8_t* panel, int k, const Group& group, typename Simd::Vec (&w)[kVecs]) {
    Decode::values(panel + static_cast<long>(k) * kRowBytes, w);
#pragma GCC unroll 16
    for (int v = 0; v < kVecs; ++v) {
      w[v] = has_offsets(kFormat) ? Simd::fmadd(w[v], group.scale[v], group.offset[v])
                                  : Simd::mul(w[v], group.scale[v]);
    }
  }
};

}  // namespace

template <class Simd, class Loader>
struct PanelKernels {
  using Vec = typename Simd::Vec;
  using Group = typename Loader::Group;
  static constexpr int kVecs = kPanelWidth / Simd::kLanes;
  // How far ahead of the rows being multiplied the panel is fetched: in decode each weight
  // is used once, so the stream must be in flight well before it is needed.
  static constexpr int kPrefetchBytes = 2048;

  // Few rows leave most accumulators idle; splitting k over several accumulator sets hides
  // the FMA latency that a single dependency chain per output vector would expose.
  template <int Rows>
  static constexpr int k_unroll() {
    constexpr int sets = Simd::kAccumulators / (Rows * kVecs);
    return sets < 1 ? 1 : (sets > 4 ? 4 : sets);
  }

  template <int Rows>
  static inline void step(Vec (&acc)[Rows][kVecs], const float* const* a, const uint8_t* panel, int k,
                          const Group& group) {
    Vec w[kVecs];
    Loader::load(panel, k, group, w);
#pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r) {
      const Vec b = Simd::broadcast(a[r] + k);
#pragma GCC unroll 16
      for (int v = 0; v < kVecs; ++v) acc[r][v] = Simd::fmadd(b, w[v], acc[r][v]);
    }
  }

  template <int Rows>
  static void tile(const float* const* a, const uint8_t* panel, int depth, int group_size, float* const* c,
                   bool accumulate) {
    constexpr int kSets = k_unroll<Rows>();
    Vec acc[kSets][Rows][kVecs];
#pragma GCC unroll 4
    for (int s = 0; s < kSets; ++s)
#pragma GCC unroll 16
      for (int r = 0; r < Rows; ++r)
#pragma GCC unroll 16
        for (int v = 0; v < kVecs; ++v) acc[s][r][v] = Simd::zero();
    // The loop below fetches kPrefetchBytes ahead; the panel's head is asked for all at once
    // here, so its misses overlap instead of stalling one by one.
    const long head = static_cast<long>(depth) * Loader::kRowBytes < kPrefetchBytes
                          ? static_cast<long>(depth) * Loader::kRowBytes : kPrefetchBytes;
    for (long line = 0; line < head; line += 64) Simd::prefetch(panel + line);
    const int span = Loader::kGrouped ? group_size : depth;
    for (int first = 0, index = 0; first < depth; first += span, ++index) {
      const Group group = Loader::group(panel, depth, group_size, index);
      const int end = depth - first < span ? depth : first + span;
      int k = first;
      for (; k + kSets <= end; k += kSets) {
        const uint8_t* rows = panel + static_cast<long>(k) * Loader::kRowBytes + kPrefetchBytes;
#pragma GCC unroll 8
        for (int line = 0; line < kSets * Loader::kRowBytes; line += 64) Simd::prefetch(rows + line);
#pragma GCC unroll 4
        for (int s = 0; s < kSets; ++s) step<Rows>(acc[s], a, panel, k + s, group);
      }
      for (; k < end; ++k) step<Rows>(acc[0], a, panel, k, group);
    }
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
  static void tail(const float* const* a, int rows, const uint8_t* panel, int depth, int group, float* const* c,
                   bool accumulate) {
    if constexpr (Rows > 0) {
      if (rows == Rows) {
        tile<Rows>(a, panel, depth, group, c, accumulate);
      } else {
        tail<Rows - 1>(a, rows, panel, depth, group, c, accumulate);
      }
    }
  }

  static void gemm(const float* const* a, int rows, const void* panel_bytes, int depth, int group, float* const* c,
                   bool accumulate) {
    const uint8_t* panel = static_cast<const uint8_t*>(panel_bytes);
    constexpr int kRows = Simd::kMainRows;
    int r = 0;
    for (; r + kRows <= rows; r += kRows) tile<kRows>(a + r, panel, depth, group, c + r, accumulate);
    tail<kRows - 1>(a + r, rows - r, panel, depth, group, c + r, accumulate);
  }

  static void widen(const void* panel_bytes, int depth, int group_size, int first, int count, float* out) {
    const uint8_t* panel = static_cast<const uint8_t*>(panel_bytes);
    const int span = Loader::kGrouped ? group_size : depth;
    const int end = first + count;
    for (int k = first; k < end;) {
      const int index = k / span;
      const Group group = Loader::group(panel, depth, group_size, index);
      const int group_end = (index + 1) * span < end ? (index + 1) * span : end;
      for (; k < group_end; ++k) {
        Simd::prefetch(panel + static_cast<long>(k) * Loader::kRowBytes + kPrefetchBytes);
        Vec w[kVecs];
        Loader::load(panel, k, group, w);
#pragma GCC unroll 16
        for (int v = 0; v < kVecs; ++v) Simd::store(out + static_cast<long>(k - first) * kPanelWidth + v * Simd::kLanes, w[v]);
      }
    }
  }

  static constexpr FormatKernels table() { return FormatKernels{&gemm, &widen, Simd::kMainRows}; }
};

}  // namespace lk::kernels
