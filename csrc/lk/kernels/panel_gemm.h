// The panel multiply shared by every ISA and format. `Simd` supplies the vector types and
// their few operations; an Unpack (one per ISA x format file) turns stored weights into
// vectors. Instantiate it only inside an anonymous namespace of an ISA's own file: each file
// is compiled with its own target flags, and the instantiations must not be merged across
// files.
//
// An Unpack names its format (static constexpr WeightFormat kFormat) and, for float formats
// (float, bf16, fp16, FP8), turns one stored row into kPanelWidth floats:
//   static void values(const uint8_t* row, Vec (&w)[kPanelWidth / Simd::kLanes]);
// FP8 may produce its values times a constant (static constexpr float kValueScale: the true
// value is what it produces divided by that) when that saves work per weight; a group's
// sums are divided by it once (applied to the sums, not folded into the scales, so a
// large scale cannot overflow). Such a constant can be tiny (AVX2 FP8: 2^-120), and then so
// are the products, most of them fp32 denormals, on which some cores (Intel's) take a
// microcode assist per instruction: an Unpack may ask for activations times a power of two
// (static constexpr float kActivationScale), which the engine applies where it prepares
// them (FormatKernels::activation_scale), and the sums are divided by both. A float Unpack
// may also produce the row's columns in another order when that saves work per weight,
// and then says how to put vectors of that order back into column order:
//   static void to_column_order(Vec (&w)[kPanelWidth / Simd::kLanes]);
// which the kernels apply to the sums once per group, not to every row.
// For INT8 and INT4 it turns one block of rows_per_block rows (formats.h) into pairs of
// rows, each column's two weights in the low and high 16 bits of one 32-bit lane:
//   static void pairs(const uint8_t* block, IVec (&w)[rows_per_block / 2][kPanelWidth / Simd::kLanes]);
// w[p][v] holds rows 2p and 2p + 1 of the block for columns v * kLanes onwards.
// An 8-bit-activation format's Unpack (INT4) may instead multiply bytes: it turns a block
// into unsigned bytes, each 32-bit lane one column's four rows in kInt4QuadOrder, each
// value plus a bias that makes it unsigned (static constexpr int kQuadBias), which the
// kernels take off with the activations' span corrections:
//   static void quads(const uint8_t* block, IVec (&w)[kPanelWidth / Simd::kLanes]);
// Simd then supplies broadcast_quad, iset1, iadd, and either quad_dot_add (the products
// added straight to 32-bit sums) or quad_products, add_quad_products and widen_add. Where
// the unsigned bytes reach past 2 * kQuadBias - 1 (MXFP4: 0..24 for bias 12), the Unpack
// names their largest (static constexpr int kQuadMax).
// MXFP4 and NVFP4 (formats.h) are multiplied as INT4 is, their values doubled; their scale
// rows are bytes (e8m0; NVFP4's scale codes), which an Unpack may turn into fp32 scales for
// a group's kPanelWidth columns (NVFP4's before its row scales, as nvfp4_code_scale does):
//   static void group_scales(const uint8_t* row, Vec (&scale)[kPanelWidth / Simd::kLanes]);
// (else they are converted one by one, as mxfp4_half_scale and nvfp4_code_scale do).
//
// Prefill may widen a panel block by block into a layout that costs less per pass (kernels.h,
// PanelWiden) and multiply that with the kernels of a second Unpack, the widened one. A
// widened Unpack reads panels that need not be a stored format's: it may give its own
// kBlockRows and kBlockBytes, and it writes what it reads, a row (float formats) or a pair
// of rows (integer formats) given as its values() or pairs() would produce them:
//   static void pack(const Vec (&w)[kPanelWidth / Simd::kLanes], uint8_t* row);
//   static void pack(const IVec (&w)[kPanelWidth / Simd::kLanes], uint8_t* pair);
// (a format whose Unpack makes quads widens them, block for block, the same way).
// Float formats widen to fp32 (F32Unpack<Simd, Unpack>), their scales applied, in the
// Unpack's column order (the widened kernels reorder their sums, as the Unpack's do). Integer
// formats keep their kFormat, values and scales (and offsets, which widen copies), so a
// widened pass computes the same integer sums as an unwidened one.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "lk/kernels/kernels.h"

namespace lk::kernels {
namespace {

// fp32 rows: as stored (Stored = void, the F32 format), or as a float Unpack `Stored`
// widens a panel where a pass converting each weight again costs more than widening a block
// once: scales applied, in Stored's column order, read with Stored's activation scale.
template <class Simd, class Stored = void>
struct F32Unpack {
  static constexpr WeightFormat kFormat = WeightFormat::F32;
  static constexpr int kVecs = kPanelWidth / Simd::kLanes;
  static constexpr float kActivationScale = [] {
    if constexpr (requires { Stored::kActivationScale; }) return Stored::kActivationScale;
    return 1.0f;
  }();
  static void to_column_order(typename Simd::Vec (&w)[kVecs]) {
    if constexpr (requires { Stored::to_column_order(w); }) Stored::to_column_order(w);
  }
  static void values(const uint8_t* row, typename Simd::Vec (&w)[kVecs]) {
    for (int v = 0; v < kVecs; ++v) w[v] = Simd::load(reinterpret_cast<const float*>(row) + v * Simd::kLanes);
  }
  static void pack(const typename Simd::Vec (&w)[kVecs], uint8_t* row) {
    for (int v = 0; v < kVecs; ++v) Simd::store(reinterpret_cast<float*>(row) + v * Simd::kLanes, w[v]);
  }
};

// kWidened: the kernels multiply panels prefill has just widened, which sit in cache, so
// they fetch nothing ahead (that would only take issue slots).
template <class Simd, class Unpack, bool kWidened = false>
struct PanelKernels {
  using Vec = typename Simd::Vec;
  static constexpr WeightFormat kFormat = Unpack::kFormat;
  static constexpr bool kGrouped = is_grouped(kFormat);
  static constexpr bool kInteger = kFormat == WeightFormat::Int8 || kFormat == WeightFormat::Int4 || is_e2m1(kFormat);
  static constexpr bool kQuads = requires { Unpack::kQuadBias; };
  static_assert([] {
    if constexpr (kQuads) return Unpack::kQuadBias == quad_bias(kFormat);
    return true;
  }(), "the activations' span biases take the Unpack's bias off");
  static constexpr int kVecs = kPanelWidth / Simd::kLanes;
  // Rows of one pass of gemm over a panel (the rows whose sums it keeps in registers).
  static constexpr int kMainRows = kInteger ? Simd::kIntegerMainRows : Simd::kMainRows;
  static constexpr int kBlockRows = [] {
    if constexpr (requires { Unpack::kBlockRows; }) return Unpack::kBlockRows;
    return rows_per_block(kFormat);
  }();
  static constexpr int kBlockBytes = [] {
    if constexpr (requires { Unpack::kBlockBytes; }) return Unpack::kBlockBytes;
    return block_bytes(kFormat);
  }();
  // How far ahead of the rows being multiplied the panel is fetched: in decode each weight
  // is used once, so the stream must be in flight well before it is needed. An Unpack may
  // give its own (static constexpr int kPrefetchBytes), else the ISA's Simd may.
  static constexpr int kPrefetchBytes = [] {
    if constexpr (requires { Unpack::kPrefetchBytes; }) return Unpack::kPrefetchBytes;
    if constexpr (requires { Simd::kPrefetchBytes; }) return Simd::kPrefetchBytes;
    return 2048;
  }();
  // An Unpack may fetch from memory into L2 only (static constexpr bool kPrefetchIntoL2 =
  // true, with the ISA's Simd::prefetch_into_l2), leaving the L1's few outstanding misses
  // to the loads.
  static constexpr bool kPrefetchIntoL2 = [] {
    if constexpr (requires { Unpack::kPrefetchIntoL2; }) return Unpack::kPrefetchIntoL2;
    return false;
  }();
  // Such a stream is also moved from L2 into L1 this far ahead, so that the loads do not
  // wait on L2 either: nearer leaves them waiting, farther gains nothing (see git log -p BENCHMARKS.md,
  // "Kernels").
  static constexpr int kL1FetchBytes = 512;

  // Unpacked values times value_scale() are the stored ones; sums of their products with
  // the activations as the kernels read them, times sum_scale(), are the true sums.
  static constexpr float value_scale() {
    if constexpr (requires { Unpack::kValueScale; }) {
      return 1.0f / Unpack::kValueScale;
    } else {
      return 1.0f;
    }
  }
  static constexpr float activation_scale() {
    if constexpr (requires { Unpack::kActivationScale; }) {
      return Unpack::kActivationScale;
    } else {
      return 1.0f;
    }
  }
  static_assert(!kInteger || activation_scale() == 1.0f, "integer kernels read the quantized rows, never scaled");
  static constexpr float sum_scale() { return value_scale() / activation_scale(); }

  // A panel's depth padded to whole blocks, and the bytes of its values: formats.h's rule,
  // applied to this Unpack's blocks.
  static int padded(int depth) { return (depth + kBlockRows - 1) / kBlockRows * kBlockRows; }
  static long value_bytes(int depth) {
    return (static_cast<long>(padded(depth)) / kBlockRows * kBlockBytes + 63) / 64 * 64;
  }
  static const float* scales(const uint8_t* panel, int depth) {
    return reinterpret_cast<const float*>(panel + value_bytes(depth));
  }
  // The rows of scales (and offsets) after the values, group_row_bytes each.
  static constexpr int kGroupRowBytes = group_row_bytes(kFormat);
  static const uint8_t* group_row(const uint8_t* panel, int depth, long row) {
    return panel + value_bytes(depth) + row * kGroupRowBytes;
  }

  // NVFP4's half row scales (formats.h), after a panel's scale rows.
  static void row_scales(const uint8_t* panel, int depth, Vec (&scale)[kVecs]) {
    const long group_rows = static_cast<long>(panel_groups(depth, kNvfp4Group)) * kGroupRowBytes;
    const float* line = reinterpret_cast<const float*>(panel + row_scale_line(value_bytes(depth), group_rows));
    for (int v = 0; v < kVecs; ++v) scale[v] = Simd::load(line + v * Simd::kLanes);
  }

  // The e2m1 formats' fp32 scales of a group from its row of scale bytes: MXFP4's halved,
  // NVFP4's times `row_scale`, its panel's half row scales (row_scales).
  static void byte_scales(const uint8_t* row, const Vec (&row_scale)[kVecs], Vec (&scale)[kVecs]) {
    if constexpr (requires { Unpack::group_scales(row, scale); }) {
      Unpack::group_scales(row, scale);
    } else {
      float lanes[kPanelWidth];
      for (int j = 0; j < kPanelWidth; ++j) {
        lanes[j] = kFormat == WeightFormat::Mxfp4 ? mxfp4_half_scale(row[j]) : nvfp4_code_scale(row[j]);
      }
      for (int v = 0; v < kVecs; ++v) scale[v] = Simd::load(lanes + v * Simd::kLanes);
    }
    if constexpr (kFormat == WeightFormat::Nvfp4) {
      for (int v = 0; v < kVecs; ++v) scale[v] = Simd::mul(scale[v], row_scale[v]);
    }
  }

  // The scales (and offsets) of group `index`, loaded once per group.
  struct Group {
    Vec scale[kVecs];
    Vec offset[kVecs];
  };
  static Group group(const uint8_t* panel, int depth, int group_size, int index) {
    Group group;
    if constexpr (is_e2m1(kFormat)) {
      Vec row_scale[kVecs]{};
      if constexpr (kFormat == WeightFormat::Nvfp4) row_scales(panel, depth, row_scale);
      byte_scales(group_row(panel, depth, index), row_scale, group.scale);
      for (int v = 0; v < kVecs; ++v) group.offset[v] = Simd::zero();
    } else {
      const float* group_scales = scales(panel, depth) + static_cast<long>(index) * kPanelWidth;
      const float* offsets = group_scales + static_cast<long>(panel_groups(depth, group_size)) * kPanelWidth;
      for (int v = 0; v < kVecs; ++v) {
        const Vec scale = Simd::load(group_scales + v * Simd::kLanes);
        group.scale[v] = scale;
        // INT4 values are stored minus 8 (formats.h).
        group.offset[v] = has_offsets(kFormat)
                              ? Simd::fmadd(scale, Simd::set1(8.0f), Simd::load(offsets + v * Simd::kLanes))
                              : Simd::zero();
      }
    }
    return group;
  }

  // Row k of a float-format panel as stored: unscaled, in the Unpack's column order.
  static void row_values(const uint8_t* panel, int k, Vec (&w)[kVecs]) {
    Unpack::values(panel + static_cast<long>(k) * kBlockBytes, w);
  }
  static void to_column_order(Vec (&w)[kVecs]) {
    if constexpr (requires { Unpack::to_column_order(w); }) Unpack::to_column_order(w);
  }

  // c[r] = the group's partial sums times its scales (and the sums' scales), added to c[r]
  // where `add` says so.
  template <int Rows>
  static void flush(const Vec (&sums)[Rows][kVecs], const Vec (&scale)[Rows][kVecs], float* const* c, bool add) {
#pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r) {
#pragma GCC unroll 16
      for (int v = 0; v < kVecs; ++v) {
        float* out = c[r] + v * Simd::kLanes;
        Simd::store(out, Simd::fmadd(sums[r][v], scale[r][v], add ? Simd::load(out) : Simd::zero()));
      }
    }
  }

  static void fetch(const void* p) {
    if constexpr (kWidened) return;
    if constexpr (kPrefetchIntoL2) {
      Simd::prefetch_into_l2(p);
    } else {
      Simd::prefetch(p);
    }
  }

  // The fetches for the line at `line` of a stream being multiplied.
  static void fetch_ahead_of(const uint8_t* line) {
    fetch(line + kPrefetchBytes);
    if constexpr (kPrefetchIntoL2 && !kWidened) Simd::prefetch(line + kL1FetchBytes);
  }

  // The scales (and offsets) follow all of a panel's values, away from the stream the loops
  // prefetch: each group fetches those of the group as far ahead as kPrefetchBytes reaches.
  static int groups_ahead(int group_size) {
    return 1 + kPrefetchBytes / (group_size / kBlockRows * kBlockBytes);
  }
  static void prefetch_group(const uint8_t* panel, int depth, int group_size, int index) {
    const int groups = static_cast<int>(panel_groups(depth, group_size));
    if (index >= groups) return;
    fetch(group_row(panel, depth, index));
    if constexpr (has_offsets(kFormat)) fetch(group_row(panel, depth, static_cast<long>(groups) + index));
  }

  // The loops fetch kPrefetchBytes ahead; a panel's head (and its first groups' scales) is
  // asked for all at once, so its misses overlap instead of stalling one by one.
  static void prefetch_start(const uint8_t* panel, int depth, int group_size) {
    const long bytes = static_cast<long>(padded(depth)) / kBlockRows * kBlockBytes;
    const long head = bytes < kPrefetchBytes ? bytes : kPrefetchBytes;
    for (long line = 0; line < head; line += 64) fetch(panel + line);
    if constexpr (kGrouped) {
      for (int index = 0, ahead = groups_ahead(group_size); index < ahead; ++index) {
        prefetch_group(panel, depth, group_size, index);
      }
    }
  }

  // Few rows leave most accumulators idle; splitting k over several accumulator sets hides
  // the FMA latency that a single dependency chain per output vector would expose.
  template <int Rows>
  static constexpr int k_unroll() {
    constexpr int sets = Simd::kAccumulators / (Rows * kVecs);
    return sets < 1 ? 1 : (sets > 4 ? 4 : sets);
  }

  // Sums kept in several sets (k_unroll, integer_sets): the later sets added into the
  // first, in set order.
  template <class V, int Sets, int Panels, int Rows, class Add>
  static inline void add_sets(V (&sets)[Sets][Panels][Rows][kVecs], Add add) {
#pragma GCC unroll 4
    for (int s = 1; s < Sets; ++s)
#pragma GCC unroll 2
      for (int p = 0; p < Panels; ++p)
#pragma GCC unroll 16
        for (int r = 0; r < Rows; ++r)
#pragma GCC unroll 16
          for (int v = 0; v < kVecs; ++v) sets[0][p][r][v] = add(sets[0][p][r][v], sets[s][p][r][v]);
  }

  template <int Rows>
  static inline void float_step(Vec (&acc)[Rows][kVecs], const ActivationRow* a, const uint8_t* panel, int k) {
    Vec w[kVecs];
    row_values(panel, k, w);
#pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r) {
      const Vec b = Simd::broadcast(a[r].values + k);
#pragma GCC unroll 16
      for (int v = 0; v < kVecs; ++v) acc[r][v] = Simd::fmadd(b, w[v], acc[r][v]);
    }
  }

  // Float formats: a group's products are summed unscaled and scaled once at its end.
  // Ungrouped formats are one group over the whole depth, with scale 1. `Panels` panels of
  // the same depth multiply the same rows side by side, panel p into c[p].
  template <int Rows, int Panels>
  static void float_pass(const ActivationRow* a, const uint8_t* const* panels, int depth, int group_size,
                         float* const* const* c, bool accumulate) {
    constexpr int kSets = k_unroll<Rows * Panels>();
    for (int p = 0; p < Panels; ++p) prefetch_start(panels[p], depth, group_size);
    const int span = kGrouped ? group_size : depth;
    const int ahead = kGrouped ? groups_ahead(group_size) : 0;
    bool add = accumulate;
    for (int first = 0, index = 0; first < depth; first += span, ++index) {
      if constexpr (kGrouped)
        for (int p = 0; p < Panels; ++p) prefetch_group(panels[p], depth, group_size, index + ahead);
      Vec acc[kSets][Panels][Rows][kVecs]{};  // zeros
      const int end = depth - first < span ? depth : first + span;
      int k = first;
      for (; k + kSets <= end; k += kSets) {
#pragma GCC unroll 2
        for (int p = 0; p < Panels; ++p) {
          const uint8_t* rows = panels[p] + static_cast<long>(k) * kBlockBytes;
#pragma GCC unroll 8
          for (int line = 0; line < kSets * kBlockBytes; line += 64) fetch_ahead_of(rows + line);
        }
#pragma GCC unroll 4
        for (int s = 0; s < kSets; ++s)
#pragma GCC unroll 2
          for (int p = 0; p < Panels; ++p) float_step<Rows>(acc[s][p], a, panels[p], k + s);
      }
      for (; k < end; ++k)
        for (int p = 0; p < Panels; ++p) float_step<Rows>(acc[0][p], a, panels[p], k);
      add_sets(acc, Simd::add);
#pragma GCC unroll 2
      for (int p = 0; p < Panels; ++p) {
#pragma GCC unroll 16
        for (int r = 0; r < Rows; ++r) to_column_order(acc[0][p][r]);
        Vec scale[Rows][kVecs];
        if constexpr (kGrouped) {
          const Group g = group(panels[p], depth, group_size, index);
          for (int r = 0; r < Rows; ++r)
            for (int v = 0; v < kVecs; ++v) {
              acc[0][p][r][v] = Simd::mul(acc[0][p][r][v], Simd::set1(sum_scale()));
              scale[r][v] = g.scale[v];
            }
        } else {
          for (int r = 0; r < Rows; ++r)
            for (int v = 0; v < kVecs; ++v) scale[r][v] = Simd::set1(sum_scale());
        }
        flush<Rows>(acc[0][p], scale, c[p], add);
      }
      add = true;
    }
  }

  // Whether Simd adds a lane's four byte products straight to its 32-bit sum
  // (quad_dot_add: VNNI's vpdpbusd) rather than summing them in 16 bits first.
  static constexpr bool kQuadDot = requires(typename Simd::IVec v) { Simd::quad_dot_add(v, v, v); };

  // The byte products of the block at `block` (rows k onwards) added to `sums`: straight
  // into 32-bit sums (kQuadDot), or into 16-bit ones, which the run's first block assigns.
  template <int Rows, bool kAssign>
  static inline void add_quads(typename Simd::IVec (&sums)[Rows][kVecs], const ActivationRow* a, const uint8_t* block,
                               int k) {
    typename Simd::IVec w[kVecs];
    Unpack::quads(block, w);
#pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r) {
      const typename Simd::IVec x = Simd::broadcast_quad(a[r].quads + k);
#pragma GCC unroll 16
      for (int v = 0; v < kVecs; ++v) {
        if constexpr (kQuadDot) {
          sums[r][v] = Simd::quad_dot_add(sums[r][v], w[v], x);
        } else if constexpr (kAssign) {
          sums[r][v] = Simd::quad_products(w[v], x);
        } else {
          sums[r][v] = Simd::add_quad_products(sums[r][v], w[v], x);
        }
      }
    }
  }

  // Blocks of quads from rows k onwards (`block` holds them). Without kQuadDot, their
  // 16-bit products are added before one widening to 32 bits: a vpmaddwd and a vpaddd per
  // row and vector per run instead of per block.
  template <int Rows, int Blocks>
  static inline void quad_run(typename Simd::IVec (&acc)[Rows][kVecs], const ActivationRow* a, const uint8_t* block,
                              int k) {
    if constexpr (kQuadDot) {
#pragma GCC unroll 2
      for (int b = 0; b < Blocks; ++b) add_quads<Rows, false>(acc, a, block + b * kBlockBytes, k + b * kBlockRows);
      return;
    }
    typename Simd::IVec t[Rows][kVecs];
    add_quads<Rows, true>(t, a, block, k);
#pragma GCC unroll 2
    for (int b = 1; b < Blocks; ++b) add_quads<Rows, false>(t, a, block + b * kBlockBytes, k + b * kBlockRows);
#pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r)
#pragma GCC unroll 16
      for (int v = 0; v < kVecs; ++v) acc[r][v] = Simd::widen_add(acc[r][v], t[r][v]);
  }

  // The longest run whose 16-bit sums cannot saturate, so that they are widened as seldom as
  // possible: each block adds to a lane two products of an unsigned weight (below twice the
  // bias) and an activation, 8 blocks for INT4 (with kQuadDot the sums are 32 bits and the
  // run only sets the step). The block loop unrolls by 2: fully unrolled, a run spills.
  // Rounded down to a power of two, so that a run divides the blocks of every group of a
  // power-of-two size it fits in (MXFP4: one run of 8 per group of 32).
  static constexpr int kQuadRunBlocks = [] {
    if constexpr (kQuads) {
      constexpr int largest = [] {
        if constexpr (requires { Unpack::kQuadMax; }) return Unpack::kQuadMax;
        return 2 * Unpack::kQuadBias - 1;
      }();
      int run = 1;
      while (2 * run <= 32767 / (2 * largest * activation_max(kFormat))) run *= 2;
      return run;
    } else {
      return 1;
    }
  }();

  // Where Simd fuses the multiply and the add (VNNI), each sum is one chain through that
  // instruction's latency, which one or two sums per block (decode) would wait on: their
  // consecutive blocks take turns among up to 4 sets of sums, added at the end of each span
  // (integers: the same bits). More sums already hide the latency and keep one set (see
  // git log -p BENCHMARKS.md, "Kernels").
  template <int Outputs, int StepBlocks>
  static constexpr int integer_sets() {
    if (!requires { requires Simd::kFusedDotAdd; } || Outputs > 2) return 1;
    int sets = 4;
    while (StepBlocks % sets != 0) --sets;
    return sets;
  }

  // `block` holds rows k onwards.
  template <int Rows>
  static inline void integer_block(typename Simd::IVec (&acc)[Rows][kVecs], const ActivationRow* a,
                                   const uint8_t* block, int k) {
    if constexpr (kQuads) {
      quad_run<Rows, 1>(acc, a, block, k);
    } else {
      typename Simd::IVec w[kBlockRows / 2][kVecs];
      Unpack::pairs(block, w);
#pragma GCC unroll 4
      for (int p = 0; p < kBlockRows / 2; ++p) {
#pragma GCC unroll 16
        for (int r = 0; r < Rows; ++r) {
          const typename Simd::IVec x = Simd::broadcast_pair(a[r].q + k + 2 * p);
#pragma GCC unroll 16
          for (int v = 0; v < kVecs; ++v) acc[r][v] = Simd::dot_add(acc[r][v], w[p][v], x);
        }
      }
    }
  }

  // INT8 / INT4: exact integer dot products of the stored values with the quantized
  // activations, moved to fp32 once per group (or kIntegerSpan) with both scales; INT4's
  // offsets add offset * (sum of the group's activations) once per group.
  template <int Rows, int Panels>
  static void integer_pass(const ActivationRow* a, const uint8_t* const* panels, int depth, int group_size,
                           float* const* const* c, bool accumulate) {
    using IVec = typename Simd::IVec;
    // A step covers one 64-byte line, or a run of quads.
    constexpr int kStepBlocks = kQuads ? kQuadRunBlocks : (kBlockBytes >= 64 ? 1 : 64 / kBlockBytes);
    constexpr int kStep = kStepBlocks * kBlockRows;
    constexpr int kSets = integer_sets<Rows * Panels, kStepBlocks>();
    for (int p = 0; p < Panels; ++p) prefetch_start(panels[p], depth, group_size);
    const int ahead = groups_ahead(group_size);
    const int padded_end = padded(depth);
    long block = 0;  // offset of the next block, the same in every panel
    bool add = accumulate;
    for (int first = 0, index = 0; first < depth; first += group_size, ++index) {
      for (int p = 0; p < Panels; ++p) prefetch_group(panels[p], depth, group_size, index + ahead);
      // Loaded only once the group's products are summed, by when its line has arrived.
      Group g[Panels]{};
      const int end = padded_end - first < group_size ? padded_end : first + group_size;
      for (int start = first; start < end; start += kIntegerSpan) {
        const int stop = end - start < kIntegerSpan ? end : start + kIntegerSpan;
        IVec sets[kSets][Panels][Rows][kVecs]{};  // zeros
        int k = start;
        for (; k + kStep <= stop; k += kStep, block += kStepBlocks * kBlockBytes) {
#pragma GCC unroll 2
          for (int p = 0; p < Panels; ++p) {
#pragma GCC unroll 4
            for (int line = 0; line < kStepBlocks * kBlockBytes; line += 64) fetch_ahead_of(panels[p] + block + line);
            if constexpr (kQuads && kSets == 1) {
              quad_run<Rows, kStepBlocks>(sets[0][p], a, panels[p] + block, k);
            } else {
#pragma GCC unroll 2
              for (int b = 0; b < kStepBlocks; b += kSets) {
#pragma GCC unroll 4
                for (int s = 0; s < kSets; ++s) {
                  integer_block<Rows>(sets[s][p], a, panels[p] + block + (b + s) * kBlockBytes, k + (b + s) * kBlockRows);
                }
              }
            }
          }
        }
        for (; k < stop; k += kBlockRows, block += kBlockBytes) {
          for (int p = 0; p < Panels; ++p) integer_block<Rows>(sets[0][p], a, panels[p] + block, k);
        }
        if constexpr (kSets > 1) add_sets(sets, Simd::iadd);
        IVec (&acc)[Panels][Rows][kVecs] = sets[0];
#pragma GCC unroll 2
        for (int p = 0; p < Panels; ++p) {
          g[p] = group(panels[p], depth, group_size, index);
          Vec sums[Rows][kVecs], scale[Rows][kVecs];
#pragma GCC unroll 16
          for (int r = 0; r < Rows; ++r) {
            const Vec row_scale = Simd::set1(a[r].scale[index]);
            if constexpr (kQuads) {
              const int correction = a[r].span_corrections[span_index(group_size, index, start - first)];
#pragma GCC unroll 16
              for (int v = 0; v < kVecs; ++v) acc[p][r][v] = Simd::iadd(acc[p][r][v], Simd::iset1(correction));
            }
#pragma GCC unroll 16
            for (int v = 0; v < kVecs; ++v) {
              sums[r][v] = Simd::to_float(acc[p][r][v]);
              scale[r][v] = Simd::mul(g[p].scale[v], row_scale);
            }
          }
          flush<Rows>(sums, scale, c[p], add);
        }
        add = true;
      }
      if constexpr (has_offsets(kFormat)) {
        for (int p = 0; p < Panels; ++p) {
          Vec offsets[Rows][kVecs], row_sums[Rows][kVecs];
          for (int r = 0; r < Rows; ++r) {
            for (int v = 0; v < kVecs; ++v) {
              offsets[r][v] = g[p].offset[v];
              row_sums[r][v] = Simd::set1(a[r].sum[index]);
            }
          }
          flush<Rows>(offsets, row_sums, c[p], true);
        }
      }
    }
  }

  // The e2m1 formats on byte products: a group is 32 inputs (MXFP4) or 16 (NVFP4) with a
  // scale per column, so its integer sums turn into fp32 once per group and row, four or
  // eight times as often as INT4's. That step is kept to what it must do: the group's byte
  // products sum in 16 bits (activation_max) onto the row's span correction (which takes the
  // weights' bias off), and the sum is converted and added times the group's and the row's
  // scales to fp32 sums held in registers, added to c once per kE2m1SumSpan inputs instead
  // of read and written per group.
  static constexpr bool kScaledQuadGroups = kQuads && is_e2m1(kFormat);
  static constexpr int kGroupBlocks = e2m1_group(kFormat) / kBlockRows;

  template <int Rows>
  static inline void add_scaled_group(Vec (&acc)[Rows][kVecs], const typename Simd::IVec (&sums)[Rows][kVecs],
                                      const ActivationRow* a, const uint8_t* scale_row, const Vec (&row_scale)[kVecs],
                                      int index) {
    Vec scale[kVecs];
    byte_scales(scale_row, row_scale, scale);
#pragma GCC unroll 16
    for (int r = 0; r < Rows; ++r) {
      const Vec activation_scale = Simd::set1(a[r].scale[index]);
#pragma GCC unroll 16
      for (int v = 0; v < kVecs; ++v) {
        acc[r][v] = Simd::fmadd(Simd::to_float(sums[r][v]), Simd::mul(scale[v], activation_scale), acc[r][v]);
      }
    }
  }

  template <int Rows, int Panels>
  static void scaled_quad_pass(const ActivationRow* a, const uint8_t* const* panels, int depth, int group_size,
                               float* const* const* c, bool accumulate) {
    using IVec = typename Simd::IVec;
    static_assert(kGroupBlocks % kQuadRunBlocks == 0, "runs divide a group");
    constexpr int kSpanBlocks = kE2m1SumSpan / kBlockRows;
    Vec row_scale[Panels][kVecs]{};
    for (int p = 0; p < Panels; ++p) {
      prefetch_start(panels[p], depth, group_size);
      if constexpr (kFormat == WeightFormat::Nvfp4) row_scales(panels[p], depth, row_scale[p]);
    }
    const int ahead = groups_ahead(group_size);
    const int blocks = depth / kBlockRows;  // whole groups (pack_e2m1_panel)
    for (int span = 0; span < blocks; span += kSpanBlocks) {
      Vec acc[Panels][Rows][kVecs];
      for (int p = 0; p < Panels; ++p)
        for (int r = 0; r < Rows; ++r)
          for (int v = 0; v < kVecs; ++v) acc[p][r][v] = Simd::zero();
      const int span_end = blocks - span < kSpanBlocks ? blocks : span + kSpanBlocks;
      for (int first = span; first < span_end; first += kGroupBlocks) {
        const int index = first / kGroupBlocks, k = first * kBlockRows;
        const long block = static_cast<long>(first) * kBlockBytes;
#pragma GCC unroll 2
        for (int p = 0; p < Panels; ++p) {
          prefetch_group(panels[p], depth, group_size, index + ahead);
          IVec sums[Rows][kVecs];
#pragma GCC unroll 16
          for (int r = 0; r < Rows; ++r)
            for (int v = 0; v < kVecs; ++v) sums[r][v] = Simd::iset1(a[r].span_corrections[index]);
#pragma GCC unroll 4
          for (int line = 0; line < kGroupBlocks * kBlockBytes; line += 64) fetch_ahead_of(panels[p] + block + line);
#pragma GCC unroll 8
          for (int b = 0; b < kGroupBlocks; b += kQuadRunBlocks) {
            quad_run<Rows, kQuadRunBlocks>(sums, a, panels[p] + block + b * kBlockBytes, k + b * kBlockRows);
          }
          add_scaled_group<Rows>(acc[p], sums, a, group_row(panels[p], depth, index), row_scale[p], index);
        }
      }
      const bool add = accumulate || span > 0;
      for (int p = 0; p < Panels; ++p) {
        for (int r = 0; r < Rows; ++r) {
          for (int v = 0; v < kVecs; ++v) {
            float* out = c[p][r] + v * Simd::kLanes;
            Simd::store(out, add ? Simd::add(Simd::load(out), acc[p][r][v]) : acc[p][r][v]);
          }
        }
      }
    }
  }

  template <int Rows, int Panels>
  static void pass(const ActivationRow* a, const uint8_t* const* panels, int depth, int group, float* const* const* c,
                   bool accumulate) {
    if constexpr (kScaledQuadGroups) {
      scaled_quad_pass<Rows, Panels>(a, panels, depth, group, c, accumulate);
    } else if constexpr (kInteger) {
      integer_pass<Rows, Panels>(a, panels, depth, group, c, accumulate);
    } else {
      float_pass<Rows, Panels>(a, panels, depth, group, c, accumulate);
    }
  }

  template <int Rows, int Panels>
  static void tail(const ActivationRow* a, int rows, const uint8_t* const* panels, int depth, int group,
                   float* const* const* c, bool accumulate) {
    if constexpr (Rows > 0) {
      if (rows == Rows) {
        pass<Rows, Panels>(a, panels, depth, group, c, accumulate);
      } else {
        tail<Rows - 1, Panels>(a, rows, panels, depth, group, c, accumulate);
      }
    }
  }

  static void gemm(const ActivationRow* a, int rows, const void* panel_bytes, int depth, int group, float* const* c,
                   bool accumulate) {
    const uint8_t* const panels[1] = {static_cast<const uint8_t*>(panel_bytes)};
    constexpr int kRows = kMainRows;
    int r = 0;
    for (; r + kRows <= rows; r += kRows) {
      float* const* const rows_c[1] = {c + r};
      pass<kRows, 1>(a + r, panels, depth, group, rows_c, accumulate);
    }
    float* const* const rest_c[1] = {c + r};
    tail<kRows - 1, 1>(a + r, rows - r, panels, depth, group, rest_c, accumulate);
  }

  // Rows gemm_pair takes: as many as leave both panels' accumulators, both panels' unpacked
  // weights (pairs of rows per block for integers, a block's quads per panel when bytes
  // are multiplied), a broadcast activation per row and one constant in registers. One
  // more row spills an accumulator, whose chain then runs through memory.
  static constexpr int pair_rows() {
    if constexpr (!Simd::kPairPanels) {
      return 0;
    } else {
      constexpr int unpacked = 2 * (kInteger && !kQuads ? kBlockRows / 2 : 1) * kVecs;
      // scaled_quad_pass also holds a group's integer sums beside each fp32 sum.
      constexpr int per_row = 2 * kVecs * (kScaledQuadGroups ? 2 : 1) + 1;
      constexpr int rows = (Simd::kRegisters - 1 - unpacked) / per_row;
      return rows < kMainRows ? rows : kMainRows;
    }
  }

  // Two panels of the same depth times the same rows (an expert's gate and up, or two of its
  // down panels), read side by side: two weight streams in flight per thread instead of one
  // after the other.
  static void gemm_pair(const ActivationRow* a, int rows, const void* first, const void* second, int depth, int group,
                        float* const* c_first, float* const* c_second, bool accumulate) {
    const uint8_t* const panels[2] = {static_cast<const uint8_t*>(first), static_cast<const uint8_t*>(second)};
    float* const* const c[2] = {c_first, c_second};
    tail<pair_rows(), 2>(a, rows, panels, depth, group, c, accumulate);
  }

  // The scales of group `index` (1 for ungrouped formats) in the Unpack's column order, so
  // that widening scales a row without moving its weights across lanes.
  static void scales_in_unpack_order(const uint8_t* panel, int depth, int group_size, int index, Vec (&out)[kVecs]) {
    float lane[kPanelWidth], column_scale[kPanelWidth], ordered[kPanelWidth];
    Vec position[kVecs];
    for (int i = 0; i < kPanelWidth; ++i) lane[i] = static_cast<float>(i);
    for (int v = 0; v < kVecs; ++v) position[v] = Simd::load(lane + v * Simd::kLanes);
    to_column_order(position);  // lane c: the unpacked lane that holds column c
    Group g{};
    if constexpr (kGrouped) g = group(panel, depth, group_size, index);
    for (int v = 0; v < kVecs; ++v) {
      Simd::store(lane + v * Simd::kLanes, position[v]);
      Simd::store(column_scale + v * Simd::kLanes, kGrouped ? g.scale[v] : Simd::set1(1.0f));
    }
    for (int c = 0; c < kPanelWidth; ++c) ordered[static_cast<int>(lane[c])] = column_scale[c];
    for (int v = 0; v < kVecs; ++v) out[v] = Simd::load(ordered + v * Simd::kLanes);
  }

  // Rows [first, first + count) of a panel as a panel `count` deep in Wide's layout
  // (PanelWiden). While a block is widened the next one is fetched: it is multiplied
  // after this one by every row of the expert, time enough for it to arrive.
  template <class Wide>
  static void widen(const void* panel_bytes, int depth, int group_size, int first, int count, void* out_bytes) {
    using Widened = PanelKernels<Simd, Wide, true>;
    static_assert(Widened::kInteger == kInteger, "a widened panel is multiplied as the stored one is");
    // Integer formats keep their scales; float formats widen to fp32 with theirs applied.
    static_assert(kInteger ? Widened::kFormat == kFormat : !Widened::kGrouped, "widened layouts");
    const uint8_t* panel = static_cast<const uint8_t*>(panel_bytes);
    uint8_t* out = static_cast<uint8_t*>(out_bytes);
    const int end = first + count;
    const int next_end = end + count < depth ? end + count : depth;
    if constexpr (kQuads) {
      // Whole blocks of quads, unpacked once (each panel's depth is padded to whole blocks).
      static_assert(Widened::kBlockRows == kBlockRows, "quads widen block for block");
      const int blocks = Widened::padded(count) / kBlockRows;
      // Past a panel's last block, the head of the panel after it in memory, which the engine
      // widens two panels on (a matrix's panels lie in order, gate's and up's side by side).
      const uint8_t* next = end < depth ? panel + static_cast<long>(end / kBlockRows) * kBlockBytes
                                        : panel + ::lk::panel_bytes(kFormat, depth, group_size);
      const int next_blocks = end < depth ? (next_end - end) / kBlockRows : blocks;
      for (int b = 0; b < blocks; ++b) {
        const uint8_t* block = panel + static_cast<long>(first / kBlockRows + b) * kBlockBytes;
        if (b < next_blocks) Simd::prefetch(next + static_cast<long>(b) * kBlockBytes);
        typename Simd::IVec w[kVecs];
        Unpack::quads(block, w);
        Wide::pack(w, out + static_cast<long>(b) * Widened::kBlockBytes);
      }
    } else if constexpr (kInteger) {
      // Whole stored blocks; pairs past the widened panel's own padding are zero.
      const int pairs = Widened::padded(count) / 2;
      for (int k = first; k < end; k += kBlockRows) {
        const uint8_t* block = panel + static_cast<long>(k / kBlockRows) * kBlockBytes;
        if (k + count < next_end) Simd::prefetch(block + static_cast<long>(count / kBlockRows) * kBlockBytes);
        typename Simd::IVec w[kBlockRows / 2][kVecs];
        Unpack::pairs(block, w);
        for (int p = 0; p < kBlockRows / 2; ++p) {
          const int pair = (k - first) / 2 + p;
          if (pair < pairs) Wide::pack(w[p], out + static_cast<long>(pair) * Widened::kBlockBytes);
        }
      }
    } else {
      static_assert(std::is_same_v<Wide, F32Unpack<Simd, Unpack>>, "float formats widen to fp32 in their own order");
      int index = kGrouped ? first / group_size : 0;
      int group_end = kGrouped ? (index + 1) * group_size : end;
      Vec scale[kVecs];
      scales_in_unpack_order(panel, depth, group_size, index, scale);
      for (int k = first; k < end; ++k) {
        if (kGrouped && k >= group_end) {
          group_end += group_size;
          scales_in_unpack_order(panel, depth, group_size, ++index, scale);
        }
        if (k + count < next_end) Simd::prefetch(panel + static_cast<long>(k + count) * kBlockBytes);
        Vec w[kVecs];
        row_values(panel, k, w);
        // value_scale() first: folded into the scales it could overflow them (kValueScale).
        if constexpr (value_scale() != 1.0f) {
#pragma GCC unroll 16
          for (int v = 0; v < kVecs; ++v) w[v] = Simd::mul(w[v], Simd::set1(value_scale()));
        }
        if constexpr (kGrouped) {
#pragma GCC unroll 16
          for (int v = 0; v < kVecs; ++v) w[v] = Simd::mul(w[v], scale[v]);
        }
        Wide::pack(w, out + static_cast<long>(k - first) * Widened::kBlockBytes);
      }
    }
    if constexpr (Widened::kGrouped) {
      // `first` is a multiple of the group: the widened panel's groups are whole ones.
      const long groups = static_cast<long>(panel_groups(count, group_size)), source_groups = panel_groups(depth, group_size);
      const uint8_t* source = group_row(panel, depth, first / group_size);
      uint8_t* target = out + Widened::value_bytes(count);
      std::memcpy(target, source, groups * kGroupRowBytes);
      if constexpr (has_offsets(kFormat)) {
        std::memcpy(target + groups * kGroupRowBytes, source + source_groups * kGroupRowBytes, groups * kGroupRowBytes);
      }
      if constexpr (kFormat == WeightFormat::Nvfp4) {
        std::memcpy(out + row_scale_line(Widened::value_bytes(count), groups * kGroupRowBytes),
                    panel + row_scale_line(value_bytes(depth), source_groups * kGroupRowBytes), 64);
      }
    }
  }

  // The kernels of this Unpack, without widening (table<Wide> adds it) or unit kernels
  // (UnitKernels::table adds them).
  static constexpr FormatKernels table() {
    constexpr PanelPairGemm pair = pair_rows() > 0 ? &gemm_pair : nullptr;
    return FormatKernels{.gemm = &gemm,
                         .integer_rows = kInteger,
                         .gemm_pair = pair,
                         .pair_rows = pair_rows(),
                         .chunk_rows = kChunkRows,
                         .activation_scale = activation_scale()};
  }
  // The kernels of this Unpack, where prefill widens panels to Wide's layout from
  // `widen_rows` rows on (by default as soon as one pass does not take them) and multiplies
  // them with Wide's gemm.
  template <class Wide>
  static constexpr FormatKernels table(int widen_rows = kMainRows + 1) {
    using Widened = PanelKernels<Simd, Wide, true>;
    static_assert(activation_scale() == Widened::activation_scale(), "both passes read the same activations");
    constexpr int row_bytes = Widened::kBlockBytes / Widened::kBlockRows;
    static_assert(row_bytes >= kPanelWidth, "kWidenedPanelBytes counts at least a byte per weight");
    FormatKernels kernels = table();
    kernels.widen = &widen<Wide>;
    kernels.widened_gemm = &Widened::gemm;
    kernels.widen_rows = widen_rows;
    kernels.widen_block = kWidenedValueBytes / row_bytes;
    static_assert(!kScaledQuadGroups || kWidenedValueBytes / row_bytes % kE2m1SumSpan == 0,
                  "widened blocks start where unwidened sums join c");
    // Each chunk of an expert's rows widens the panel again, and a chunk below widen_rows
    // unpacks in every pass: the largest chunks leave the fewest experts a second, short one.
    kernels.chunk_rows = kMaxPanelRows;
    return kernels;
  }
};

}  // namespace
}  // namespace lk::kernels
