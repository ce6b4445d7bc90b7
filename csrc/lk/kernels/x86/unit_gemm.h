// Prefill on staged rows: one or two panels times up to kMaxPanelRows activation rows that
// the engine staged once per chunk (kernels.h, StageRows) for all the panels it multiplies,
// by a unit that multiplies 64-byte rows of activations by 64-byte rows of weights (a
// panel's 16 columns, several inputs per 32-bit lane) into fp32 or 32-bit sums: AMX tiles
// (amx/tile_unit.h: 16 x 16 sums per instruction) or AVX512_BF16's vdpbf16ps
// (avx512_bf16/dot_unit.h: 16 sums of two bf16 products each, per instruction).
//
// Decode (few rows) stays on the AVX512 panel kernels: it streams each weight once, and a
// unit would mostly multiply padding. A call walks its panels in blocks of inputs
// (Tiles::kBlockInputs): a block's weights are widened into whole weight tiles in
// `workspace` (zero past the block's last input, so whatever activations a tile row reads
// there add nothing), and the unit runs the rows over them. While it multiplies block b,
// the core widens block b + 1, a share at every unit step so that the unit never waits
// for it, and, for the grouped formats, then finishes block b - 1.
//
// Integer formats (AMX only) compute the integer sums of the AVX512_VNNI kernels exactly,
// a span at a time, and finish them with the same fp32 operations (PanelKernels::group and
// ::flush, per span and row), so a token's result is the same bits whether the tiles or
// the AVX512_VNNI kernels multiplied it. bf16 keeps its fp32 sums over the whole depth and adds
// them to the outputs at the end; FP8, unpacked to bf16 exactly, does too where the unit can
// scale its sums (AVX512_BF16: kept in units of the current group's scales), else has its
// sums finished with their group's scales block by block, as the integer formats do. For
// both, the fp32 activations are multiplied as the sum of two bf16 values, the second
// their rounding error, which leaves each within 2^-18 of its value where one bf16 moves
// it by up to 2^-9; the second plane is skipped
// for a chunk whose activations bf16 holds exactly (a bf16 model's inputs to gate and up).
//
// A unit, Unit<UnitKernels<...>>, gives:
//   Session                       RAII state for one call (AMX: the tiles' shapes)
//   work_steps<RowTiles, Panels>(call, steps): how often it calls Overlap::step() for a
//                                 block of `steps` weight tiles
//   block_sums<RowTiles, Panels>(call, stride, block, steps, weights, sums, overlap): the
//                                 block's sums alone into `sums` (grouped formats)
//   begin_running_sums, add_to_running_sums (as block_sums), end_running_sums: sums over
//                                 every block, in `sums` after the last (bf16)
//   kScalesRunningSums, add_to_scaled_running_sums (as add_to_running_sums, the sums so far
//                                 first multiplied by a factor per panel): FP8's running sums
#pragma once

#include <immintrin.h>

#include <bit>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include "lk/kernels/panel_gemm.h"

namespace lk::kernels {
namespace {

// A block's weights are widened in tiles of 16 rows of 64 bytes, what an AMX tile holds;
// the sums are kept as fp32 or 32-bit rows of a panel's 16 columns.
constexpr int kWeightTileBytes = kTileRows * kTileRowBytes;
constexpr int kSumRowBytes = kPanelWidth * 4;
constexpr int kSumTileBytes = kTileRows * kSumRowBytes;

// Two vectors of 16 words (the low and high halves of `words`), interleaved into 16 32-bit
// lanes, each holding the first's word in its low half and the second's in its high half:
// two rows of a panel (bf16 or FP8, or an INT8 pair of rows each) as tiles pair them.
inline __m512i interleave_words(__m512i words) {
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(order, words);
}

// What a format's tiles multiply. kBlockInputs: inputs of a block (whole spans, for the
// integer formats); kInputBytes: bytes a staged row takes per input, in kPlanes planes of
// equal size; kInputsPerTileRow: inputs one 64-byte tile row holds; kStoredBytes: bytes a
// panel stores per input; stage() writes one staged row and returns how many of its planes
// are not all zero; weight_rows() is how many weight-tile rows the panel's inputs [start,
// stop) make and weight_row() one of them.

// INT4: the activations' quads (signed bytes, in kInt4QuadOrder) times the weights as
// unsigned bytes q (Unpack::quads, one weight-tile row per stored block of 4 inputs, the
// same order): tdpbsud gives the integer sums vpdpbusd does, from which the kernels take
// the bias off.
template <class Unpack>
struct Int4Tiles {
  static constexpr int kBlockInputs = kIntegerSpan;
  static constexpr int kInputBytes = 1;
  static constexpr int kPlanes = 1;
  static constexpr int kInputsPerTileRow = 64;
  static constexpr int kStoredBytes = kInt4BytesPerBlock / kInt4RowsPerBlock;
  static int stage(const ActivationRow& a, int depth, uint8_t* row, long stride) {
    const int bytes = (depth + 3) / 4 * 4;  // ActivationRow: zero up to a multiple of 4
    std::memcpy(row, a.quads, bytes);
    std::memset(row + bytes, 0, stride - bytes);
    return kPlanes;
  }
  // Inputs [start, stop) are multiples of 4 (a block each).
  static int weight_rows(int start, int stop) { return (stop - start) / 4; }
  static __m512i weight_row(const uint8_t* panel, int start, int i) {
    __m512i quads[1];
    Unpack::quads(panel + static_cast<long>(start / 4 + i) * kInt4BytesPerBlock, quads);
    return quads[0];
  }
  static __m512i sums(const uint8_t* plane_sums, long) { return _mm512_loadu_si512(plane_sums); }
};

// INT8: int16 activations times int8 weights, as tiles multiply bytes only: each
// activation x = 256 h + l with h signed and l unsigned bytes, in two planes; the sums of
// h (tdpbssd) times 256 plus those of l (tdpbusd) are the sums of x exactly (a span's
// sums stay below 2^31, kernels.h). Weight-tile rows are four inputs per column, two
// stored pairs of rows interleaved.
struct Int8Tiles {
  static constexpr int kBlockInputs = kIntegerSpan;
  static constexpr int kInputBytes = 2;
  static constexpr int kPlanes = 2;
  static constexpr int kInputsPerTileRow = 64;
  static constexpr int kStoredBytes = kPanelWidth;
  static int stage(const ActivationRow& a, int depth, uint8_t* row, long stride) {
    const long plane = stride / 2;
    int8_t* high = reinterpret_cast<int8_t*>(row);
    uint8_t* low = row + plane;
    const int padded = (depth + 3) / 4 * 4;  // ActivationRow: zero up to a multiple of 4
    int k = 0;
    for (; k + 32 <= padded; k += 32) {
      const __m512i q = _mm512_loadu_si512(a.q + k);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(high + k), _mm512_cvtepi16_epi8(_mm512_srai_epi16(q, 8)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(low + k), _mm512_cvtepi16_epi8(_mm512_and_si512(q, _mm512_set1_epi16(0xff))));
    }
    for (; k < padded; ++k) {
      high[k] = static_cast<int8_t>(a.q[k] >> 8);
      low[k] = static_cast<uint8_t>(a.q[k] & 0xff);
    }
    std::memset(high + padded, 0, plane - padded);
    std::memset(low + padded, 0, plane - padded);
    return kPlanes;
  }
  // Inputs [start, stop) are multiples of 4 but for the panel's last pair, whose partner
  // pair lies in the zeroed padding of its values (formats.h).
  static int weight_rows(int start, int stop) { return (stop - start + 3) / 4; }
  static __m512i weight_row(const uint8_t* panel, int start, int i) {
    return interleave_words(
        _mm512_loadu_si512(panel + static_cast<long>(start / 2 + 2 * i) * kInt8RowsPerBlock * kPanelWidth));
  }
  // A row's sums: the high plane's times 256 plus the low plane's (`plane` bytes on).
  static __m512i sums(const uint8_t* plane_sums, long plane) {
    return _mm512_add_epi32(_mm512_slli_epi32(_mm512_loadu_si512(plane_sums), 8),
                            _mm512_loadu_si512(plane_sums + plane));
  }
};

// Float formats: each fp32 activation as bf16 (nearest even) in the first plane and the
// bf16 of what that misses in the second, two inputs per 32-bit lane, multiplied by bf16
// weights (tdpbf16ps) into fp32 sums; weight-tile rows are two panel rows interleaved. An
// odd depth's last row pairs with the zeroed padding of the values (formats.h: whole
// 64-byte lines). Blocks of 128 inputs, so that the double-buffered weights of two bf16
// panels take half of a 32 KiB L1, not all of it.
struct FloatTiles {
  static constexpr int kBlockInputs = 128;
  static constexpr int kInputBytes = 4;
  static constexpr int kPlanes = 2;
  static constexpr int kInputsPerTileRow = 32;
  static int stage(const ActivationRow& a, int depth, uint8_t* row, long stride) {
    const long plane = stride / 2;
    __m512i rests = _mm512_setzero_si512();
    for (int k = 0; k < depth; k += 32) {
      const int left = depth - k;
      const __mmask16 low = left >= 16 ? 0xffff : (1u << left) - 1;
      const __mmask16 high = left >= 32 ? 0xffff : left > 16 ? (1u << (left - 16)) - 1 : 0;
      const __m512 x0 = _mm512_maskz_loadu_ps(low, a.values + k), x1 = _mm512_maskz_loadu_ps(high, a.values + k + 16);
      const __m512i hi = (__m512i)_mm512_cvtne2ps_pbh(x1, x0);
      const __m512 h0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(hi)), 16));
      const __m512 h1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(hi, 1)), 16));
      const __m512i rest = (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(x1, h1), _mm512_sub_ps(x0, h0));
      _mm512_storeu_si512(row + 2 * k, hi);
      _mm512_storeu_si512(row + plane + 2 * k, rest);
      rests = _mm512_or_si512(rests, rest);
    }
    const long written = (depth + 31) / 32 * 64;
    std::memset(row + written, 0, plane - written);
    std::memset(row + plane + written, 0, plane - written);
    return _mm512_test_epi32_mask(rests, rests) ? 2 : 1;
  }
  static int weight_rows(int start, int stop) { return (stop - start + 1) / 2; }
};

struct Bf16Tiles : FloatTiles {
  static constexpr int kStoredBytes = kPanelWidth * 2;
  static __m512i weight_row(const uint8_t* panel, int start, int i) {
    return interleave_words(_mm512_loadu_si512(panel + static_cast<long>(start + 2 * i) * kStoredBytes));
  }
};

// FP8 (e4m3) weights, as bf16 values times Unpack::kValueScale (2^-8, the panel kernels'
// scale: a group's sums are multiplied back by PanelKernels::sum_scale), which bf16 holds
// exactly, subnormals included (four significant bits at most, 2^-17 the least). A byte's
// low 7 bits index two 128-byte tables, the bf16 bits' low and high bytes; the sign is the
// byte's own top bit: fewer vector operations than widening through fp16 and fp32 as the
// panel kernels do, since the core's widening bounds FP8 prefill while the unit is busy.
// Two tile rows at a time (one 64-byte line), so that the lookups use every lane.
template <class Unpack>
struct Fp8Tiles : FloatTiles {
  static constexpr int kStoredBytes = kPanelWidth;
  struct alignas(64) ByteTables {
    uint8_t low[128];
    uint8_t high[128];
  };
  static constexpr ByteTables kBf16Bytes = [] {
    ByteTables tables{};
    for (int magnitude = 0; magnitude < 128; ++magnitude) {
      const int exponent = magnitude >> 3, mantissa = magnitude & 7;
      // (8 + mantissa) 2^(exponent - 10), or mantissa 2^-9 for exponent 0.
      float value = static_cast<float>(exponent ? 8 + mantissa : mantissa) * Unpack::kValueScale;
      for (int e = exponent ? exponent : 1; e < 10; ++e) value *= 0.5f;
      for (int e = 10; e < exponent; ++e) value *= 2.0f;
      const uint32_t bits = std::bit_cast<uint32_t>(value) >> 16;
      tables.low[magnitude] = static_cast<uint8_t>(bits);
      tables.high[magnitude] = static_cast<uint8_t>(bits >> 8);
    }
    return tables;
  }();
  // Weight rows i and i + 1 (panel rows start + 2i to start + 2i + 3: one 64-byte line of
  // the values, padded to whole lines), so that the table lookups use every lane.
  static constexpr int kWidenStep = 2;
  static void weight_row_pair(const uint8_t* panel, int start, int i, __m512i (&rows)[2]) {
    const __m512i bytes = _mm512_loadu_si512(panel + static_cast<long>(start + 2 * i) * kStoredBytes);
    const __m512i* tables = reinterpret_cast<const __m512i*>(&kBf16Bytes);
    const __m512i low = _mm512_permutex2var_epi8(_mm512_load_si512(tables), bytes, _mm512_load_si512(tables + 1));
    const __m512i high = _mm512_ternarylogic_epi32(
        _mm512_permutex2var_epi8(_mm512_load_si512(tables + 2), bytes, _mm512_load_si512(tables + 3)), bytes,
        _mm512_set1_epi8(static_cast<char>(0x80)), 0xf8);  // high | (bytes & sign)
    // Word 2j: the first panel row's input j, word 2j + 1: the second's; each word's low
    // byte from `low` (indices 0-63), its high byte from `high` (64 on). The second weight
    // row takes the line's other two panel rows, 32 bytes on.
    const __m512i order = _mm512_set_epi8(
        95, 31, 79, 15, 94, 30, 78, 14, 93, 29, 77, 13, 92, 28, 76, 12, 91, 27, 75, 11, 90, 26, 74, 10, 89, 25,
        73, 9, 88, 24, 72, 8, 87, 23, 71, 7, 86, 22, 70, 6, 85, 21, 69, 5, 84, 20, 68, 4, 83, 19, 67, 3, 82, 18,
        66, 2, 81, 17, 65, 1, 80, 16, 64, 0);
    rows[0] = _mm512_permutex2var_epi8(low, order, high);
    rows[1] = _mm512_permutex2var_epi8(low, _mm512_add_epi8(order, _mm512_set1_epi8(32)), high);
  }
};

// What stage() found out about the rows, in the staged rows' first line (kernels.h).
struct StagedRowsHeader {
  int planes;  // planes holding anything but zeros (the float formats' second bf16 plane may not)
};

// The blocks of a panel `depth` inputs deep: pieces of `block` inputs (an integer span at
// most) of each quantization group in order (a float format is one group).
struct BlockWalk {
  int depth, group, end_of_values, block;
  int first = 0, index = 0, start = 0;
  int group_end() const { return end_of_values - first < group ? end_of_values : first + group; }
  int stop() const { return group_end() - start < block ? group_end() : start + block; }
  bool last_of_group() const { return stop() == group_end(); }
  bool done() const { return first >= depth; }
  void advance() {
    start += block;
    if (start < group_end()) return;
    first += group;
    ++index;
    start = first;
  }
};

template <class Simd, class Unpack, class FormatTiles, template <class> class Unit>
struct UnitKernels {
  using Panel = PanelKernels<Simd, Unpack>;
  using Tiles = FormatTiles;
  using Units = Unit<UnitKernels>;
  using Vec = typename Simd::Vec;
  using IVec = typename Simd::IVec;
  static_assert(Panel::kVecs == 1, "a panel row is one vector");
  static_assert(Panel::activation_scale() == 1.0f, "rows are staged as the engine prepares them, unscaled");
  static constexpr long kWeightBytes = (Tiles::kBlockInputs / Tiles::kInputsPerTileRow) * kWeightTileBytes;
  // Row tiles one call takes. The float formats take twice the engine's usual chunk: a
  // block of weights, widened once, serves all of them, so a layer reads each expert's
  // weights from memory half as often. The integer formats, which keep two blocks' sums of
  // every row and plane, gain nothing from more (see BENCHMARKS.md, "MoE layer").
  static constexpr int kRowTiles = (Panel::kInteger ? kChunkRows : kMaxPanelRows) / kTileRows;
  // One panel's sums for every row of a multiply; the float formats add their planes into
  // the same sums, the integer formats keep each plane's.
  static constexpr long kPanelSumBytes = kRowTiles * kSumTileBytes;
  static constexpr long kSumBytes = (Panel::kInteger ? Tiles::kPlanes : 1) * 2L * kPanelSumBytes;
  // The grouped formats finish each block into a copy of the outputs here and store it
  // once, at the end: the down projection's output rows lie far apart, and finishing
  // straight into them took a large share of the kernel.
  static constexpr long kFinishedBytes = Panel::kGrouped ? 2 * kPanelSumBytes : 0;
  // Two blocks' widened weights of two panels, then two blocks' sums, the second block's
  // of each kParityOffset further on than back to back would put it: the core writes one block's buffer while
  // the tiles read the other's, in step, and at equal addresses modulo 4 KiB (all sizes
  // here are multiples of it) every load would wait on the store it seems to alias.
  static constexpr long kParityOffset = 2048;
  static_assert(2 * 2 * kWeightBytes + 2 * kSumBytes + 2 * kParityOffset + kFinishedBytes <=
                    static_cast<long>(kUnitWorkspaceBytes),
                "the tile workspace holds what the pipeline keeps");
  // How many blocks on the panels' lines are fetched while a block is multiplied.
  static constexpr int kFetchBlocks = 2;

  static long row_stride(int depth) { return static_cast<long>(staged_row_stride(Tiles::kInputBytes, depth)); }

  static void stage(const ActivationRow* a, int rows, int depth, void* out) {
    uint8_t* staged = static_cast<uint8_t*>(out) + kTileRowBytes;
    const long stride = row_stride(depth);
    int planes = 1;
    for (int r = 0; r < rows; ++r) {
      const int used = Tiles::stage(a[r], depth, staged + r * stride, stride);
      planes = used > planes ? used : planes;
    }
    const int padded_rows = (rows + kTileRows - 1) / kTileRows * kTileRows;
    std::memset(staged + rows * stride, 0, (padded_rows - rows) * stride + kTileRowBytes);
    const StagedRowsHeader header{planes};
    std::memcpy(out, &header, sizeof header);
  }

  // One call's panels, outputs and buffers.
  template <int Panels>
  struct Call {
    const ActivationRow* a;
    const uint8_t* staged;  // the rows, past the header's line
    int planes;             // StagedRowsHeader::planes
    int rows, depth, group;
    const uint8_t* const* panels;
    float* const* const* c;
    uint8_t* weights[2];  // by block parity: Panels x kWeightBytes
    uint8_t* sums[2];     // by block parity: kSumBytes
    float* finished;      // kFinishedBytes: per panel kPanelSumBytes, rows kPanelWidth floats apart
  };

  // Weight rows a widening step makes: Tiles::kWidenStep where the Tiles make them in pairs.
  static constexpr int kWidenStep = [] {
    if constexpr (requires { Tiles::kWidenStep; }) return Tiles::kWidenStep;
    return 1;
  }();
  // Weight rows i onwards of the block from input `start`, zero from row `real` on.
  static void widened_rows(const uint8_t* panel, int start, int i, int real, __m512i (&rows)[kWidenStep]) {
    if constexpr (kWidenStep == 2) {
      if (i < real) {
        Tiles::weight_row_pair(panel, start, i, rows);
        if (i + 1 >= real) rows[1] = _mm512_setzero_si512();
      } else {
        rows[0] = rows[1] = _mm512_setzero_si512();
      }
    } else {
      rows[0] = i < real ? Tiles::weight_row(panel, start, i) : _mm512_setzero_si512();
    }
  }

  // What the core does while the tiles multiply a block: widen the next block (weight rows
  // of each panel, then zero rows to a whole tile) and fetch the panels' lines further on,
  // a share per tile step.
  template <int Panels>
  struct Overlap {
    const Call<Panels>* call;
    // Widening: block `next` into call->weights[next_parity]: `widen_rows` rows per panel,
    // `next_rows` of them real, the rest zero.
    BlockWalk next;
    bool widening = false;
    int next_parity = 0, next_rows = 0, widen_rows = 0, widen_share = 0;
    int widen_panel = 0, widen_row = 0;  // the next row to widen
    // Fetching: each panel's lines from next_line up to end_line.
    const uint8_t* next_line[Panels];
    const uint8_t* end_line[Panels];
    int fetch_share = 0;

    void step() {
      widen(widen_share);
      for (int p = 0; p < Panels; ++p) {
        for (int line = 0; line < fetch_share && next_line[p] < end_line[p]; ++line, next_line[p] += 64) {
          _mm_prefetch(reinterpret_cast<const char*>(next_line[p]), _MM_HINT_T0);
        }
      }
    }
    // Block `block` is next to widen, into weights[parity], over `work_steps` tile steps.
    void widen_next(const BlockWalk& block, int parity, int work_steps) {
      next = block;
      widening = !block.done();
      next_parity = parity;
      next_rows = widening ? Tiles::weight_rows(block.start, block.stop()) : 0;
      widen_rows = (next_rows + kTileRows - 1) / kTileRows * kTileRows;
      widen_panel = widen_row = 0;
      const int steps_share = (Panels * widen_rows + work_steps - 1) / work_steps;
      widen_share = (steps_share + kWidenStep - 1) / kWidenStep * kWidenStep;
    }
    void complete() { widen(Panels * widen_rows); }
    // While `block` is multiplied over `work_steps` tile steps: widen the one after it into
    // weights[parity ^ 1], fetch lines kFetchBlocks blocks on.
    void overlap_block(const BlockWalk& block, int parity, int work_steps) {
      BlockWalk following = block;
      following.advance();
      widen_next(following, parity ^ 1, work_steps);
      const long block_bytes = static_cast<long>(Tiles::kBlockInputs) * Tiles::kStoredBytes;
      for (int p = 0; p < Panels; ++p) {
        next_line[p] = call->panels[p] + static_cast<long>(block.start) * Tiles::kStoredBytes + kFetchBlocks * block_bytes;
        end_line[p] = next_line[p] + block_bytes;
      }
      fetch_share = static_cast<int>((block_bytes / 64 + work_steps - 1) / work_steps);
    }

    // The loops keep their state in locals: stored through `this`, it would be reloaded
    // after every 64-byte store (which might alias it).
    void widen(int count) {
      if (!widening) return;
      int p = widen_panel, i = widen_row;
      const int start = next.start, real = next_rows, rows = widen_rows;
      uint8_t* const out = call->weights[next_parity];
      while (count > 0 && p < Panels) {
        const uint8_t* panel = call->panels[p];
        uint8_t* panel_out = out + p * kWeightBytes;
        const int end = i + count < rows ? i + count : rows;
        count -= end - i;
        for (; i < end; i += kWidenStep) {
          __m512i rows_at[kWidenStep];
          widened_rows(panel, start, i, real, rows_at);
          for (int j = 0; j < kWidenStep; ++j) {
            _mm512_storeu_si512(panel_out + static_cast<long>(i + j) * kTileRowBytes, rows_at[j]);
          }
        }
        if (i == rows) {
          i = 0;
          ++p;
        }
      }
      widen_panel = p;
      widen_row = i;
    }
  };

  // call.finished += a finished block's sums (`sums`), scaled, for every row and panel, as
  // PanelKernels::group and ::flush finish a group (the grouped formats; bf16 keeps its sums
  // in the tiles). This runs after the next block's tiles are issued, all at once: spread
  // over the tile steps, as the widening is, it was slower (see git log -p BENCHMARKS.md, "Kernels").
  template <int Panels>
  static void finish_block(const Call<Panels>& call, const BlockWalk& block, const uint8_t* sums, bool add) {
    typename Panel::Group groups[Panels];
    for (int p = 0; p < Panels; ++p) groups[p] = Panel::group(call.panels[p], call.depth, call.group, block.index);
    [[maybe_unused]] const int span = span_index(block.group, block.index, block.start - block.first);
    // Row by row, each panel in turn: what a row brings (its scale, span sum and sum) is read
    // once for the panels, and before the stores, which might alias it as far as the
    // compiler knows (so are the call's fields).
    const int rows = call.rows;
    const ActivationRow* const a = call.a;
    float* const finished = call.finished;
    for (int r = 0; r < rows; ++r) {
      const ActivationRow& row = a[r];
      Vec row_scale{}, activation_sum{};
      [[maybe_unused]] IVec bias_correction{};
      if constexpr (Panel::kInteger) row_scale = Simd::set1(row.scale[block.index]);
      if constexpr (Panel::kQuads) bias_correction = Simd::iset1(row.span_corrections[span]);
      if constexpr (has_offsets(Unpack::kFormat)) activation_sum = Simd::set1(row.sum[block.index]);
      for (int p = 0; p < Panels; ++p) {
        const uint8_t* row_sums_bytes = sums + p * kPanelSumBytes + static_cast<long>(r) * kSumRowBytes;
        float* const out[1] = {row_of(finished, p, r)};
        Vec row_sums[1][1], scale[1][1];
        if constexpr (Panel::kInteger) {
          IVec acc = Tiles::sums(row_sums_bytes, 2L * kPanelSumBytes);
          if constexpr (Panel::kQuads) acc = Simd::iadd(acc, bias_correction);
          row_sums[0][0] = Simd::to_float(acc);
          scale[0][0] = Simd::mul(groups[p].scale[0], row_scale);
        } else {
          // As PanelKernels::float_pass scales a group's sums.
          row_sums[0][0] =
              Simd::mul(Simd::load(reinterpret_cast<const float*>(row_sums_bytes)), Simd::set1(Panel::sum_scale()));
          scale[0][0] = groups[p].scale[0];
        }
        Panel::template flush<1>(row_sums, scale, out, add);
        if constexpr (has_offsets(Unpack::kFormat)) {
          if (block.last_of_group()) {
            const Vec offsets[1][1] = {{groups[p].offset[0]}};
            const Vec activation_sums[1][1] = {{activation_sum}};
            Panel::template flush<1>(offsets, activation_sums, out, true);
          }
        }
      }
    }
  }

  static BlockWalk first_block(int depth, int group) {
    return BlockWalk{.depth = depth,
                     .group = Panel::kGrouped ? group : depth,
                     .end_of_values = Panel::padded(depth),
                     .block = Tiles::kBlockInputs};
  }
  static int block_steps(const BlockWalk& block) {
    return (Tiles::weight_rows(block.start, block.stop()) + kTileRows - 1) / kTileRows;
  }
  // The walk's overlap, with `first` (the first block) widened into call.weights[0].
  template <int Panels>
  static Overlap<Panels> first_block_widened(const Call<Panels>& call, const BlockWalk& first) {
    Overlap<Panels> overlap{};
    overlap.call = &call;
    overlap.widen_next(first, 0, 1);
    overlap.complete();
    return overlap;
  }

  // Grouped formats: block by block (within a quantization group: for the integer formats,
  // within an integer span), every row tile and plane, the sums stored and finished with
  // their group's scales per block.
  template <int RowTiles, int Panels>
  static void multiply_grouped(const Call<Panels>& call, bool accumulate) {
    [[maybe_unused]] const typename Units::Session session;
    const long stride = row_stride(call.depth);
    BlockWalk block = first_block(call.depth, call.group);
    Overlap<Panels> overlap = first_block_widened(call, block);
    if (accumulate) read_outputs(call, call.finished);
    // Block b - 1 is finished once block b's products are issued; the first block (start
    // 0) adds to the outputs' copy only where `accumulate` (else assigns it).
    BlockWalk previous = block;
    int parity = 0;
    for (; !block.done(); previous = block, block.advance(), parity ^= 1) {
      const int steps = block_steps(block);
      overlap.overlap_block(block, parity, Units::template work_steps<RowTiles, Panels>(call, steps));
      Units::template block_sums<RowTiles, Panels>(call, stride, block, steps, call.weights[parity],
                                                   call.sums[parity], overlap);
      overlap.complete();
      if (block.start > 0) finish_block(call, previous, call.sums[parity ^ 1], accumulate || previous.start > 0);
    }
    if (!previous.done()) finish_block(call, previous, call.sums[parity ^ 1], accumulate || previous.start > 0);
    write_outputs(call, call.finished, false);
  }

  // Row r of panel p in fp32 rows laid out as the sum tiles store them (per panel
  // kPanelSumBytes, rows kPanelWidth floats apart).
  template <class Float>
  static Float* row_of(Float* rows, int p, int r) {
    return rows + p * (kPanelSumBytes / sizeof(float)) + r * kPanelWidth;
  }
  // Each row's outputs into `rows` (laid out as row_of says): the grouped formats finish
  // their blocks there, in the order and with the operations of the panel kernels, so that
  // the integer formats' results keep their bits.
  template <int Panels>
  static void read_outputs(const Call<Panels>& call, float* rows) {
    for (int p = 0; p < Panels; ++p) {
      for (int r = 0; r < call.rows; ++r) {
        Simd::store(row_of(rows, p, r), Simd::load(call.c[p][r]));
      }
    }
  }
  // The outputs = (or, `add`, +=) each row's values in `rows` (laid out as row_of says),
  // times the panel's `scales`.
  template <int Panels>
  static void write_outputs(const Call<Panels>& call, const float* rows, bool add, const Vec (&scales)[Panels]) {
    for (int p = 0; p < Panels; ++p) {
      for (int r = 0; r < call.rows; ++r) {
        const Vec row = Simd::mul(Simd::load(row_of(rows, p, r)), scales[p]);
        Simd::store(call.c[p][r], add ? Simd::add(Simd::load(call.c[p][r]), row) : row);
      }
    }
  }
  template <int Panels>
  static void write_outputs(const Call<Panels>& call, const float* rows, bool add) {
    Vec ones[Panels];
    for (Vec& one : ones) one = Simd::set1(1.0f);
    write_outputs(call, rows, add, ones);
  }

  // bf16: block by block too, every row of the block, its sums running from the first
  // block to the last (where the unit keeps them: Unit::begin_running_sums); the outputs
  // get them once, at the end, so that every block's weights are read from memory once
  // while the tiles work on the one before.
  //
  // kScaled (FP8, on a unit that can scale its running sums): the same walk, the sums kept
  // in units of the current group's scales. A group's first block multiplies the sums so
  // far by the previous group's scales over its own, and the outputs get the sums times
  // the last group's. Against finishing every block's sums into the outputs
  // (multiply_grouped), that saves a pass over every row's sums and outputs per block.
  template <int RowTiles, int Panels, bool kScaled>
  static void multiply_floats(const Call<Panels>& call, bool accumulate) {
    [[maybe_unused]] const typename Units::Session session;
    const long stride = row_stride(call.depth);
    BlockWalk block = first_block(call.depth, call.group);
    Overlap<Panels> overlap = first_block_widened(call, block);
    Units::template begin_running_sums<RowTiles, Panels>(call.sums[0]);
    int last_group = 0;
    for (int parity = 0; !block.done(); last_group = block.index, block.advance(), parity ^= 1) {
      const int steps = block_steps(block);
      overlap.overlap_block(block, parity, Units::template work_steps<RowTiles, Panels>(call, steps));
      if constexpr (kScaled) {
        Vec carry[Panels];
        for (int p = 0; p < Panels; ++p) {
          carry[p] = _mm512_div_ps(group_scales(call, p, last_group), group_scales(call, p, block.index));
        }
        Units::template add_to_scaled_running_sums<RowTiles, Panels>(call, stride, block, steps, call.weights[parity],
                                                                     call.sums[0], overlap, carry);
      } else {
        Units::template add_to_running_sums<RowTiles, Panels>(call, stride, block, steps, call.weights[parity],
                                                              call.sums[0], overlap);
      }
      overlap.complete();
    }
    Units::template end_running_sums<RowTiles, Panels>(call.sums[0]);
    const float* sums = reinterpret_cast<const float*>(call.sums[0]);
    if constexpr (kScaled) {
      Vec scales[Panels];
      for (int p = 0; p < Panels; ++p) {
        scales[p] = Simd::mul(group_scales(call, p, last_group), Simd::set1(Panel::sum_scale()));
      }
      write_outputs(call, sums, accumulate, scales);
    } else {
      write_outputs(call, sums, accumulate);
    }
  }
  template <int Panels>
  static Vec group_scales(const Call<Panels>& call, int p, int index) {
    return Panel::group(call.panels[p], call.depth, call.group, index).scale[0];
  }

  // Whether every panel's scales let the sums run in units of them (multiply_floats,
  // kScaled): each a normal float, and in each column within kScaleRange of each other, so
  // that the sums, divided by the smallest, stay far from fp32's overflow. A zero scale (a
  // group of zero weights) would divide by zero; such panels are finished block by block.
  static constexpr float kScaleRange = 0x1p32f;
  template <int Panels>
  static bool scales_run(const Call<Panels>& call) {
    const int groups = static_cast<int>(panel_groups(call.depth, call.group));
    for (int p = 0; p < Panels; ++p) {
      const float* scales = Panel::scales(call.panels[p], call.depth);
      __m512 least = _mm512_set1_ps(std::numeric_limits<float>::max()), most = _mm512_setzero_ps();
      for (int g = 0; g < groups; ++g) {
        const __m512 magnitude = _mm512_abs_ps(_mm512_loadu_ps(scales + static_cast<long>(g) * kPanelWidth));
        // Ordered comparisons: a NaN fails them.
        const __mmask16 normal =
            _mm512_cmp_ps_mask(magnitude, _mm512_set1_ps(std::numeric_limits<float>::min()), _CMP_GE_OQ) &
            _mm512_cmp_ps_mask(magnitude, _mm512_set1_ps(std::numeric_limits<float>::max()), _CMP_LE_OQ);
        if (normal != 0xffff) return false;
        least = _mm512_min_ps(least, magnitude);
        most = _mm512_max_ps(most, magnitude);
      }
      if (_mm512_cmp_ps_mask(most, _mm512_mul_ps(least, _mm512_set1_ps(kScaleRange)), _CMP_LE_OQ) != 0xffff) {
        return false;
      }
    }
    return true;
  }

  template <int Panels>
  static void run(const ActivationRow* a, const void* staged, int rows, const uint8_t* const* panels, int depth,
                  int group, float* const* const* c, bool accumulate, void* workspace) {
    uint8_t* space = static_cast<uint8_t*>(workspace);
    uint8_t* sums = space + 4 * kWeightBytes + kParityOffset;
    StagedRowsHeader header;
    std::memcpy(&header, staged, sizeof header);
    const Call<Panels> call{.a = a,
                            .staged = static_cast<const uint8_t*>(staged) + kTileRowBytes,
                            .planes = header.planes,
                            .rows = rows,
                            .depth = depth,
                            .group = group,
                            .panels = panels,
                            .c = c,
                            .weights = {space, space + 2 * kWeightBytes + kParityOffset},
                            .sums = {sums, sums + kSumBytes + kParityOffset},
                            .finished = reinterpret_cast<float*>(sums + 2 * kSumBytes + kParityOffset)};
    const int row_tiles = (rows + kTileRows - 1) / kTileRows;
    [&]<int... Index>(std::integer_sequence<int, Index...>) {
      ((row_tiles == Index + 1 && (multiply<Index + 1, Panels>(call, accumulate), true)) || ...);
    }(std::make_integer_sequence<int, kRowTiles>{});
  }

  // Flattened and inlined into run(), so that each of the (up to 16) instantiations has
  // the overlap's widening inlined in its tile loop: GCC's own limits stop inlining it at
  // that many instantiations, and a call per tile step is slow.
  template <int RowTiles, int Panels>
  [[gnu::flatten, gnu::always_inline]] static inline void multiply(const Call<Panels>& call, bool accumulate) {
    if constexpr (!Panel::kGrouped) {
      multiply_floats<RowTiles, Panels, false>(call, accumulate);
    } else if constexpr (!Panel::kInteger && Units::kScalesRunningSums) {
      if (scales_run(call)) {
        multiply_floats<RowTiles, Panels, true>(call, accumulate);
      } else {
        multiply_grouped<RowTiles, Panels>(call, accumulate);
      }
    } else {
      multiply_grouped<RowTiles, Panels>(call, accumulate);
    }
  }

  static void gemm(const ActivationRow* a, const void* staged, int rows, const void* panel, int depth, int group,
                   float* const* c, bool accumulate, void* workspace) {
    const uint8_t* const panels[1] = {static_cast<const uint8_t*>(panel)};
    float* const* const outputs[1] = {c};
    run<1>(a, staged, rows, panels, depth, group, outputs, accumulate, workspace);
  }

  static void gemm_pair(const ActivationRow* a, const void* staged, int rows, const void* first, const void* second,
                        int depth, int group, float* const* c_first, float* const* c_second, bool accumulate,
                        void* workspace) {
    const uint8_t* const panels[2] = {static_cast<const uint8_t*>(first), static_cast<const uint8_t*>(second)};
    float* const* const outputs[2] = {c_first, c_second};
    run<2>(a, staged, rows, panels, depth, group, outputs, accumulate, workspace);
  }

  // `base`, the panel kernels of the same Unpack, with the unit taking `unit_rows` rows
  // and more.
  static constexpr FormatKernels table(FormatKernels base, int unit_rows) {
    base.stage_rows = &stage;
    base.unit_gemm = &gemm;
    base.unit_gemm_pair = &gemm_pair;
    base.unit_rows = unit_rows;
    base.staged_input_bytes = Tiles::kInputBytes;
    base.chunk_rows = kRowTiles * kTileRows;
    return base;
  }
};

}  // namespace
}  // namespace lk::kernels
