// The AMX unit that x86/unit_gemm.h drives: one tile instruction multiplies
// 16 rows x 64 bytes of activations by 16 rows x 64 bytes of weights into 16 x 16 sums,
// 16K byte products or 8K bf16 ones, where an AVX512 instruction makes 64 or 16.
//
// Sum tiles 0-3 (tile 2t + p: the pass's row tile t, panel p), activation tiles 4 and 5,
// weight tiles 6 and 7: the rows run two row tiles at a time. With two panels (an expert's
// gate and up, or two of its down panels) four sum tiles take each tile of rows and of
// weights twice, which halves what the activations cost to load (from L2, they would
// otherwise hold the tile multiplies back).
#pragma once

#include <type_traits>
#include <utility>

#include "lk/kernels/x86/amx/tiles.h"
#include "lk/kernels/x86/unit_gemm.h"

namespace lk::kernels {
namespace {

template <class K>
struct AmxUnit {
  using Session = TileShapes;
  using Panel = typename K::Panel;
  using Tiles = typename K::Tiles;
  template <int Panels>
  using Call = typename K::template Call<Panels>;
  template <int Panels>
  using Overlap = typename K::template Overlap<Panels>;
  static constexpr long kPanelSumBytes = K::kPanelSumBytes;

  // A plane's products: INT4 signed activation bytes by unsigned weight bytes (tdpbsud, the
  // sums vpdpbusd gives), INT8's high plane signed by signed (tdpbssd) and its low plane
  // unsigned by signed (tdpbusd), the float formats bf16 pairs (tdpbf16ps).
  template <int Plane>
  using Dot = std::conditional_t<
      Panel::kQuads, SignedUnsigned,
      std::conditional_t<Panel::kInteger, std::conditional_t<Plane == 0, SignedSigned, UnsignedSigned>, Bf16Pairs>>;

  // The sums stay in the tiles, which nothing multiplies by a scale: FP8 finishes each
  // block's sums (UnitKernels::multiply_grouped).
  static constexpr bool kScalesRunningSums = false;

  // A pass takes up to two row tiles.
  template <int RowTiles, int Panels>
  static int work_steps(const Call<Panels>& call, int steps) {
    return steps * call.planes * ((RowTiles + 1) / 2);
  }

  template <int RowTiles, int Panels>
  static void block_sums(const Call<Panels>& call, long stride, const BlockWalk& block, int steps,
                         const uint8_t* weights, uint8_t* sums, Overlap<Panels>& overlap) {
    multiply_block<RowTiles, Panels, false>(call, stride, block, steps, weights, sums, overlap);
  }

  // bf16's running sums: one pass (up to two row tiles) keeps them in the tiles from the
  // first block to the last, sparing a load and a store per block; more passes carry them
  // from block to block in `sums`.
  template <int RowTiles>
  static constexpr bool kOnePass = RowTiles <= 2;

  template <int RowTiles, int Panels>
  static void begin_running_sums(uint8_t* sums) {
    if constexpr (kOnePass<RowTiles>) {
      zero_pass<RowTiles, Panels>();
    } else {
      for (int p = 0; p < Panels; ++p) std::memset(sums + p * kPanelSumBytes, 0, RowTiles * kSumTileBytes);
    }
  }
  template <int RowTiles, int Panels>
  static void add_to_running_sums(const Call<Panels>& call, long stride, const BlockWalk& block, int steps,
                                  const uint8_t* weights, uint8_t* sums, Overlap<Panels>& overlap) {
    if constexpr (kOnePass<RowTiles>) {
      const uint8_t* block_rows = call.staged + static_cast<long>(block.start) * Tiles::kInputBytes / Tiles::kPlanes;
      plane_steps<RowTiles, Panels>(block_rows, stride, weights, steps, call.planes, overlap);
    } else {
      multiply_block<RowTiles, Panels, true>(call, stride, block, steps, weights, sums, overlap);
    }
  }
  template <int RowTiles, int Panels>
  static void end_running_sums(uint8_t* sums) {
    if constexpr (kOnePass<RowTiles>) store_pass<RowTiles, Panels>(sums, 0);
  }

  // The sum tiles of a pass of PassTiles row tiles over Panels panels: zeroed, loaded from
  // or stored to `sums` (per panel kPanelSumBytes), rows from `first_row`.
  template <int PassTiles, int Panels>
  static void zero_pass() {
    tile_zero<0>();
    if constexpr (Panels > 1) tile_zero<1>();
    if constexpr (PassTiles > 1) tile_zero<2>();
    if constexpr (PassTiles > 1 && Panels > 1) tile_zero<3>();
  }
  template <int PassTiles, int Panels>
  static void store_pass(uint8_t* sums, int first_row) {
    uint8_t* rows = sums + static_cast<long>(first_row) * kSumRowBytes;
    tile_store<0>(rows, kSumRowBytes);
    if constexpr (Panels > 1) tile_store<1>(rows + kPanelSumBytes, kSumRowBytes);
    if constexpr (PassTiles > 1) tile_store<2>(rows + kSumTileBytes, kSumRowBytes);
    if constexpr (PassTiles > 1 && Panels > 1) tile_store<3>(rows + kPanelSumBytes + kSumTileBytes, kSumRowBytes);
  }
  template <int PassTiles, int Panels>
  static void load_pass(const uint8_t* sums, int first_row) {
    const uint8_t* rows = sums + static_cast<long>(first_row) * kSumRowBytes;
    tile_load<0>(rows, kSumRowBytes);
    if constexpr (Panels > 1) tile_load<1>(rows + kPanelSumBytes, kSumRowBytes);
    if constexpr (PassTiles > 1) tile_load<2>(rows + kSumTileBytes, kSumRowBytes);
    if constexpr (PassTiles > 1 && Panels > 1) tile_load<3>(rows + kPanelSumBytes + kSumTileBytes, kSumRowBytes);
  }

  // Every row tile times the block's widened weights, two row tiles a pass, each plane,
  // into `sums`.
  template <int RowTiles, int Panels, bool kCarry>
  static void multiply_block(const Call<Panels>& call, long stride, const BlockWalk& block, int steps,
                             const uint8_t* weights, uint8_t* sums, Overlap<Panels>& overlap) {
    const long plane_bytes = stride / Tiles::kPlanes;
    const uint8_t* rows = call.staged + static_cast<long>(block.start) * Tiles::kInputBytes / Tiles::kPlanes;
    if constexpr (Panel::kInteger) {
      // INT8's planes have sums of their own (Tiles::sums combines them).
      [&]<int... Planes>(std::integer_sequence<int, Planes...>) {
        (passes<RowTiles, Panels, kCarry>(rows + Planes * plane_bytes, stride, sums + Planes * 2L * kPanelSumBytes,
                                          [&]<int PassTiles>(const uint8_t* pass_rows) {
                                            pass_steps<PassTiles, Panels, Planes>(pass_rows, stride, weights, steps,
                                                                                  overlap);
                                          }),
         ...);
      }(std::make_integer_sequence<int, Tiles::kPlanes>{});
    } else {
      passes<RowTiles, Panels, kCarry>(rows, stride, sums, [&]<int PassTiles>(const uint8_t* pass_rows) {
        plane_steps<PassTiles, Panels>(pass_rows, stride, weights, steps, call.planes, overlap);
      });
    }
  }

  // Each pass of up to two row tiles, from row tile FirstTile on: its sum tiles zeroed (or,
  // kCarry, loaded from `sums`), `multiply` (of those rows), and stored to `sums`.
  template <int RowTiles, int Panels, bool kCarry, int FirstTile = 0, class Multiply>
  static void passes(const uint8_t* rows, long stride, uint8_t* sums, Multiply multiply) {
    constexpr int kTiles = RowTiles - FirstTile > 1 ? 2 : 1;
    constexpr int kFirstRow = FirstTile * kTileRows;
    if constexpr (kCarry) {
      load_pass<kTiles, Panels>(sums, kFirstRow);
    } else {
      zero_pass<kTiles, Panels>();
    }
    multiply.template operator()<kTiles>(rows + kFirstRow * stride);
    store_pass<kTiles, Panels>(sums, kFirstRow);
    if constexpr (FirstTile + kTiles < RowTiles) {
      passes<RowTiles, Panels, kCarry, FirstTile + kTiles>(rows, stride, sums, multiply);
    }
  }

  // The float formats' planes into the same sums: the second where it holds anything.
  template <int PassTiles, int Panels>
  static void plane_steps(const uint8_t* rows, long stride, const uint8_t* weights, int steps, int planes,
                          Overlap<Panels>& overlap) {
    pass_steps<PassTiles, Panels, 0>(rows, stride, weights, steps, overlap);
    if (planes > 1) pass_steps<PassTiles, Panels, 1>(rows + stride / 2, stride, weights, steps, overlap);
  }

  template <int PassTiles, int Panels, int Plane>
  static void pass_steps(const uint8_t* rows, long stride, const uint8_t* weights, int steps,
                         Overlap<Panels>& overlap) {
    using PlaneDot = Dot<Plane>;
    const long second = kTileRows * stride;
    for (int s = 0; s < steps; ++s, rows += kTileRowBytes) {
      const uint8_t* step_weights = weights + static_cast<long>(s) * kWeightTileBytes;
      tile_load<4>(rows, stride);
      if constexpr (PassTiles > 1) tile_load<5>(rows + second, stride);
      tile_load<6>(step_weights, kTileRowBytes);
      if constexpr (Panels > 1) tile_load<7>(step_weights + K::kWeightBytes, kTileRowBytes);
      PlaneDot::template dot<0, 4, 6>();
      if constexpr (Panels > 1) PlaneDot::template dot<1, 4, 7>();
      if constexpr (PassTiles > 1) PlaneDot::template dot<2, 5, 6>();
      if constexpr (PassTiles > 1 && Panels > 1) PlaneDot::template dot<3, 5, 7>();
      overlap.step();
    }
  }
};

}  // namespace
}  // namespace lk::kernels
