// The AVX512_BF16 unit that x86/unit_gemm.h drives, for CPUs with bf16 dot
// products but no AMX tiles (AMD Zen 4 and 5). A vdpbf16ps adds 16 columns' sums of two
// bf16 products each: one weight-tile row (a panel's 16 columns, two inputs per 32-bit
// lane) times one row's pair of inputs, broadcast from the staged rows. It issues at the
// rate of a vfmadd231ps, which makes half as many products, so rows exact in bf16 (one
// plane) multiply faster than fp32 can.
//
// A pass keeps kPassRows rows' sums of every panel in registers over a block's weights
// (16 sums: with two panels each loaded weight row serves 8 rows, each broadcast two
// panels), loading them from and storing them to `sums` once per block. The last pass
// stops at the last row, where it has fewer: a break in the same loop, so that GCC keeps
// the full passes' registers (a pass of its own per row count changes them, and the full
// passes slow down), and rows past the last cost nothing.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "lk/kernels/x86/unit_gemm.h"

namespace lk::kernels {
namespace {

template <class K>
struct Avx512Bf16Unit {
  struct Session {};  // nothing to set up per call
  using Panel = typename K::Panel;
  using Tiles = typename K::Tiles;
  static_assert(!Panel::kInteger, "the integer formats keep the AVX512_VNNI kernels on this CPU");
  template <int Panels>
  using Call = typename K::template Call<Panels>;
  template <int Panels>
  using Overlap = typename K::template Overlap<Panels>;
  static constexpr int kPassRows = 8;
  // Weight-tile rows per unit step: one tile, as the AMX unit steps.
  static constexpr int kStepRows = kWeightTileBytes / kTileRowBytes;
  // Bytes of one input in one plane of a staged row.
  static constexpr int kPlaneInputBytes = Tiles::kInputBytes / Tiles::kPlanes;
  static_assert(kPlaneInputBytes == 2, "a plane holds bf16 activations");

  template <int RowTiles, int Panels>
  static int work_steps(const Call<Panels>& call, int steps) {
    return steps * call.planes * ((call.rows + kPassRows - 1) / kPassRows);
  }

  // A pass's sums start at zero (a block's sums alone), as `sums` holds them (running
  // sums), or as those times a factor per panel (running sums in units of a group's
  // scales: UnitKernels::multiply_floats).
  enum class Start { kZero, kCarried, kScaled };
  static constexpr bool kScalesRunningSums = true;

  template <int RowTiles, int Panels>
  static void block_sums(const Call<Panels>& call, long stride, const BlockWalk& block, int steps,
                         const uint8_t* weights, uint8_t* sums, Overlap<Panels>& overlap) {
    multiply_block<Panels, Start::kZero>(call, stride, block, steps, weights, sums, overlap, nullptr);
  }
  template <int RowTiles, int Panels>
  static void begin_running_sums(uint8_t* sums) {
    for (int p = 0; p < Panels; ++p) std::memset(sums + p * K::kPanelSumBytes, 0, RowTiles * kSumTileBytes);
  }
  template <int RowTiles, int Panels>
  static void add_to_running_sums(const Call<Panels>& call, long stride, const BlockWalk& block, int steps,
                                  const uint8_t* weights, uint8_t* sums, Overlap<Panels>& overlap) {
    multiply_block<Panels, Start::kCarried>(call, stride, block, steps, weights, sums, overlap, nullptr);
  }
  template <int RowTiles, int Panels>
  static void add_to_scaled_running_sums(const Call<Panels>& call, long stride, const BlockWalk& block, int steps,
                                         const uint8_t* weights, uint8_t* sums, Overlap<Panels>& overlap,
                                         const __m512 (&carry)[Panels]) {
    multiply_block<Panels, Start::kScaled>(call, stride, block, steps, weights, sums, overlap, carry);
  }
  template <int RowTiles, int Panels>
  static void end_running_sums(uint8_t*) {}

  // Every pass of kPassRows rows (the last stopping at the call's last row) times the
  // block's widened weights, each plane, into `sums`, the pass's sums starting as kStart
  // says (kScaled: times carry[p]).
  template <int Panels, Start kStart>
  static void multiply_block(const Call<Panels>& call, long stride, const BlockWalk& block, int steps,
                             const uint8_t* weights, uint8_t* sums, Overlap<Panels>& overlap,
                             const __m512* carry) {
    const uint8_t* rows = call.staged + static_cast<long>(block.start) * kPlaneInputBytes;
    for (int first = 0; first < call.rows; first += kPassRows) {
      __m512 acc[kPassRows][Panels];
      uint8_t* pass_sums = sums + static_cast<long>(first) * kSumRowBytes;
#pragma GCC unroll 8
      for (int r = 0; r < kPassRows; ++r)
#pragma GCC unroll 2
        for (int p = 0; p < Panels; ++p) {
          const float* running = reinterpret_cast<const float*>(pass_sums + p * K::kPanelSumBytes + r * kSumRowBytes);
          if constexpr (kStart == Start::kZero) acc[r][p] = _mm512_setzero_ps();
          if constexpr (kStart == Start::kCarried) acc[r][p] = _mm512_loadu_ps(running);
          if constexpr (kStart == Start::kScaled) acc[r][p] = _mm512_mul_ps(_mm512_loadu_ps(running), carry[p]);
        }
      const uint8_t* pass_rows = rows + first * stride;
      const int live_rows = call.rows - first;
      for (int plane = 0; plane < call.planes; ++plane) {
        plane_steps<Panels>(acc, pass_rows + plane * (stride / Tiles::kPlanes), stride, weights, steps, overlap,
                            live_rows);
      }
#pragma GCC unroll 8
      for (int r = 0; r < kPassRows; ++r)
#pragma GCC unroll 2
        for (int p = 0; p < Panels; ++p) _mm512_storeu_ps(pass_sums + p * K::kPanelSumBytes + r * kSumRowBytes, acc[r][p]);
    }
  }

  template <int Panels>
  static void plane_steps(__m512 (&acc)[kPassRows][Panels], const uint8_t* rows, long stride, const uint8_t* weights,
                          int steps, Overlap<Panels>& overlap, int live_rows) {
    for (int s = 0; s < steps; ++s) {
      const uint8_t* step_weights = weights + static_cast<long>(s) * kWeightTileBytes;
      const uint8_t* step_rows = rows + static_cast<long>(s) * kStepRows * 2 * kPlaneInputBytes;
#pragma GCC unroll 4
      for (int i = 0; i < kStepRows; ++i) {
        __m512bh w[Panels];
#pragma GCC unroll 2
        for (int p = 0; p < Panels; ++p) {
          w[p] = (__m512bh)_mm512_loadu_si512(step_weights + p * K::kWeightBytes + i * kTileRowBytes);
        }
        const uint8_t* pair = step_rows + i * 2 * kPlaneInputBytes;
#pragma GCC unroll 8
        for (int r = 0; r < kPassRows; ++r) {
          if (r >= live_rows) break;
          int32_t inputs;
          std::memcpy(&inputs, pair + r * stride, sizeof inputs);
          const __m512bh x = (__m512bh)_mm512_set1_epi32(inputs);
#pragma GCC unroll 2
          for (int p = 0; p < Panels; ++p) acc[r][p] = _mm512_dpbf16_ps(acc[r][p], x, w[p]);
        }
      }
      overlap.step();
    }
  }
};

}  // namespace
}  // namespace lk::kernels
