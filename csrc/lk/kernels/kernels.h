// The kernel interface the engine calls. Weights are stored as panels of kPanelWidth output
// columns (formats.h); a kernel multiplies fp32 activation rows by one panel.
// Implementations live in one file per ISA x weight format and are picked at run time from
// the CPU's abilities.
#pragma once

#include "lk/common.h"
#include "lk/cpu_features.h"
#include "lk/formats.h"

namespace lk::kernels {

// One activation row as the kernels read it. `values` (fp32) serves every kernel. Formats
// whose kernels multiply in integers (FormatKernels::integer_rows) read instead the row
// quantized per weight group, prepared once per forward: q[k] * scale[k / group]
// approximates values[k] (int16, |q| <= activation_max(format), zero up to a multiple of 4
// inputs), and sum[k / group] is the group's exact fp32 sum, which INT4 offsets multiply.
// Formats quantized to 8 bits (INT4, the e2m1 formats) also carry q as bytes, each four
// inputs from a multiple of 4 on in the order an INT4 lane holds them (formats.h,
// kInt4QuadOrder), and per span of inputs whose byte products a kernel sums before moving
// them to fp32 (span_index) the span's sum of q times minus the format's quad_bias: what
// takes the weights' bias off those products when added to their sum (or started from).
struct ActivationRow {
  const float* values;
  const int16_t* q;
  const float* scale;
  const float* sum;
  const int8_t* quads;
  const int32_t* span_corrections;

  // The row of fp32 values alone, for kernels that read nothing else.
  static ActivationRow of_values(const float* values) {
    return {.values = values, .q = nullptr, .scale = nullptr, .sum = nullptr, .quads = nullptr, .span_corrections = nullptr};
  }
};
// INT8: 16 bits keep the quantization error of an activation below 2^-16 of its group's
// largest magnitude, far below that of the weights. INT4: 8 bits (2^-8), still far below
// INT4's own error, let the kernels multiply bytes, twice as many per instruction. Every
// ISA quantizes a format's activations alike, so all multiply the same integers.
// MXFP4 multiplies bytes as INT4 does, at 85 steps: a group's 16 products per 16-bit lane
// of weights biased to 0..24 then stay below 2^15 (16 * 24 * 85 = 32640), so its sums
// widen once per group (per 32 inputs, finer than INT4's 127 steps per 128 in practice).
// NVFP4's groups of 16 give 8 products a lane, below 2^15 at 127 steps.
constexpr int activation_max(WeightFormat format) {
  if (format == WeightFormat::Mxfp4) return 85;
  return format == WeightFormat::Int4 || format == WeightFormat::Nvfp4 ? 127 : 32767;
}

// The unsigned bias a format's weight bytes carry where the kernels multiply bytes (INT4's
// q - 8 stored as q; the e2m1 formats' doubled values plus 12), 0 for the others.
constexpr int quad_bias(WeightFormat format) {
  if (format == WeightFormat::Int4) return 8;
  return is_e2m1(format) ? 12 : 0;
}

// The e2m1 formats' scaled group sums add up in fp32 over this many inputs before joining
// the output, in decode as in prefill's widened blocks (which start on its multiples), so
// that a token's result keeps its bits whatever is batched with it.
constexpr int kE2m1SumSpan = 1024;

// Integer products are summed over at most this many inputs of one group before the sums
// move to fp32 (128 products of int8 weights and int16 activations per 32-bit lane stay
// below 2^31). Span s of group g covers inputs from g * group + s * kIntegerSpan.
constexpr int kIntegerSpan = 256;
static inline int spans_per_group(int group) { return (group + kIntegerSpan - 1) / kIntegerSpan; }
static inline int span_index(int group, int group_index, int offset_in_group) {
  return group_index * spans_per_group(group) + offset_in_group / kIntegerSpan;
}

// For r < rows and j < kPanelWidth:
//   c_rows[r][j] (+)= sum_{k < depth} a_rows[r][k] * weight(panel)[k][j]
// added to c when `accumulate`, stored otherwise. `group` is the quantization group of
// grouped formats (a multiple of 16), ignored by the others.
using PanelGemm = void (*)(const ActivationRow* a_rows, int rows, const void* panel, int depth, int group,
                           float* const* c_rows, bool accumulate);
// Writes rows [first, first + count) of a panel as a panel `count` deep in a layout that
// costs less per pass (values, then the groups' scales and offsets where the format keeps
// them), which FormatKernels::widened_gemm multiplies: prefill unpacks each weight once
// per block and reuses it for every token of the expert. Grouped formats widen whole
// groups (`first` a multiple of `group`). `out` holds kWidenedPanelBytes.
using PanelWiden = void (*)(const void* panel, int depth, int group, int first, int count, void* out);
// Bytes of the values of one widened block: it stays in L1 while every token of the
// expert uses it. Widened layouts take at least a byte per weight.
constexpr int kWidenedValueBytes = 16384;
// The most a widened block takes: its values, and a scale and an offset per group of 16 or
// more inputs.
constexpr std::size_t kWidenedPanelBytes =
    kWidenedValueBytes + 2 * (kWidenedValueBytes / kPanelWidth / 16) * kPanelWidth * sizeof(float);

// A unit kernel's workspace: each panel's weights widened into tiles and the unit's
// sums, both for two blocks of inputs (one being multiplied, the next being widened and the
// last being finished meanwhile), and the grouped formats' finished sums.
constexpr std::size_t kUnitWorkspaceBytes = 68 * 1024;
// What a worker holds for either: the `widened` argument of multiply_panel and
// multiply_two_panels.
constexpr std::size_t kPanelWorkspaceBytes =
    kWidenedPanelBytes > kUnitWorkspaceBytes ? kWidenedPanelBytes : kUnitWorkspaceBytes;

// c_first as PanelGemm with `first`, and c_second with `second`, for rows up to
// FormatKernels::pair_rows: the two panels are read side by side.
using PanelPairGemm = void (*)(const ActivationRow* a_rows, int rows, const void* first, const void* second,
                               int depth, int group, float* const* c_first, float* const* c_second, bool accumulate);

// Unit kernels (prefill on a matrix unit: AMX tiles, AVX512_BF16 pair products;
// x86/unit_gemm.h) load activation rows from memory at a fixed stride, so they multiply
// rows staged for them: the engine stages a chunk of rows once (stage_rows) and hands the
// staged rows to every panel it multiplies by that chunk, as staging them for each panel
// would cost about as much as the multiply. `staged` holds staged_bytes(kernels, rows,
// depth) bytes.
using StageRows = void (*)(const ActivationRow* a_rows, int rows, int depth, void* staged);
// c_rows[r] (+)= a_rows[r] x panel as PanelGemm, the rows read from `staged` (and, for
// their scales and sums, a_rows); `workspace` holds kUnitWorkspaceBytes.
using UnitGemm = void (*)(const ActivationRow* a_rows, const void* staged, int rows, const void* panel, int depth,
                          int group, float* const* c_rows, bool accumulate, void* workspace);
// Two panels of the same depth by the same staged rows, into c_first and c_second.
using UnitPairGemm = void (*)(const ActivationRow* a_rows, const void* staged, int rows, const void* first,
                              const void* second, int depth, int group, float* const* c_first,
                              float* const* c_second, bool accumulate, void* workspace);

// Built with designated initializers (PanelKernels::table and the tables that extend it):
// what a table leaves out is null or zero.
struct FormatKernels {
  PanelGemm gemm = nullptr;
  PanelWiden widen = nullptr;              // null where gemm serves every row count best
  PanelGemm widened_gemm = nullptr;        // multiplies what widen wrote
  int widen_rows = 0;                      // fewest rows prefill widens for
  int widen_block = 0;                     // inputs per widened block (kWidenedValueBytes of values)
  bool integer_rows = false;               // gemm reads the quantized ActivationRow fields
  PanelPairGemm gemm_pair = nullptr;       // null where the ISA reads one panel at a time
  int pair_rows = 0;                       // most rows gemm_pair takes (0 without it)
  StageRows stage_rows = nullptr;          // null where no unit kernel exists
  UnitGemm unit_gemm = nullptr;            // multiplies rows stage_rows staged
  UnitPairGemm unit_gemm_pair = nullptr;
  int unit_rows = 0;                       // fewest rows the engine stages for unit_gemm
  int staged_input_bytes = 0;              // bytes of one input of one staged row
  int chunk_rows = 0;                      // an expert's rows per call (at most kMaxPanelRows)
  // Every kernel of the format reads ActivationRow::values multiplied by this power of two
  // (1 for most), which the engine applies where it prepares them (panel_gemm.h, Unpack's
  // kActivationScale).
  float activation_scale = 0.0f;
};

// Whether the format's unit kernels take `rows` rows (so the engine stages them).
inline bool unit_takes(const FormatKernels& kernels, int rows) {
  return kernels.stage_rows != nullptr && rows >= kernels.unit_rows;
}

// Staged rows: one 64-byte line that stage_rows fills for its kernels (what it found out
// about the rows), then the rows: each staged_input_bytes bytes per input over depth
// rounded up to 64 inputs, so that every row (and every plane of a row the kernels split
// into planes, two at most) starts a line, plus a line per plane, as many rows as fill
// whole tiles of kTileRows, and one line more, which a tile row may read past the end.
// The extra lines spread a tile's 16 rows over the L1's sets: rows a power of two apart
// (bf16 or INT4 at 2048 inputs) would all fall on one or two sets.
constexpr int kTileRows = 16;
constexpr int kTileRowBytes = 64;
inline std::size_t staged_row_stride(int input_bytes, int depth) {
  return ((static_cast<std::size_t>(depth) + kTileRowBytes - 1) / kTileRowBytes * input_bytes + 2) * kTileRowBytes;
}
inline std::size_t staged_row_stride(const FormatKernels& kernels, int depth) {
  return staged_row_stride(kernels.staged_input_bytes, depth);
}
inline std::size_t staged_bytes(const FormatKernels& kernels, int rows, int depth) {
  const std::size_t tiles = (static_cast<std::size_t>(rows) + kTileRows - 1) / kTileRows;
  return kTileRowBytes + tiles * kTileRows * staged_row_stride(kernels, depth) + kTileRowBytes;
}

struct ActivationParams {
  float swiglu_alpha;
  float swiglu_limit;
};

// out[r * out_stride + j] = weights[r] * act(g[j]) * u[j] for r < rows and j < count, g
// and u row r of `gate` and `up` (kPanelWidth apart): the gated activation of one panel's
// rows, each scaled by its token's routing weight.
using ActivationRows = void (*)(const float* gate, const float* up, int rows, int count, const float* weights,
                                const ActivationParams& params, float* out, std::size_t out_stride);

struct ActivationKernels {
  ActivationRows rows[kNumActivations];  // indexed by Activation
};

struct KernelSet {
  Isa isa;
  FormatKernels format[kNumWeightFormats];  // indexed by WeightFormat
  ActivationKernels activation;

  const FormatKernels& operator[](WeightFormat f) const { return format[static_cast<int>(f)]; }
};

// The kernels for `isa`, which the caller has checked the CPU supports.
const KernelSet& kernel_set(Isa isa);

// Rows one multiply_panel call takes at most; the engine gives a format's kernels
// chunk_rows at a time (kChunkRows, or more where the kernels widen blocks of weights,
// which more rows then reuse).
constexpr int kMaxPanelRows = 128;
constexpr int kChunkRows = 64;

// c_rows[r] (+)= a_rows[r] x panel for `count` <= kMaxPanelRows rows, as the engine
// multiplies: rows that fit one pass (decode) convert the weights while streaming them;
// more rows (prefill) would convert them once per pass, so where the kernels widen, the
// panel is widened block by block into `widened` (kPanelWorkspaceBytes) and multiplied there.
// `staged`: the rows as the format's stage_rows staged them, or null; where given, the unit
// kernel multiplies them.
void multiply_panel(const KernelSet& kernels, WeightFormat format, const void* panel, int depth, int group,
                    const ActivationRow* a_rows, int count, float* const* c_rows, bool accumulate, void* widened,
                    const void* staged = nullptr);

// The rows staged into `buffer` (staged_bytes) for the format's unit kernels where those
// take `count` rows, else null: what multiply_panel and multiply_two_panels take as
// `staged`.
const void* stage_for_unit(const FormatKernels& kernels, const ActivationRow* a_rows, int count, int depth,
                           void* buffer);

// Two panels of the same depth times the same rows into first_rows and second_rows (an
// expert's gate and up, or two of its down panels): side by side where the kernels read
// two panels at once for this many rows, by the unit kernels where `staged`.
void multiply_two_panels(const KernelSet& kernels, WeightFormat format, const void* first, const void* second,
                         int depth, int group, const ActivationRow* a_rows, int count, float* const* first_rows,
                         float* const* second_rows, bool accumulate, void* widened, const void* staged = nullptr);

// Per ISA x format tables, each defined in its own file (generic/<format>.cpp,
// x86/<isa>/<format>.cpp) and named <isa>_<format> after it: avx512_bf16 is the AVX512
// kernels' bf16, avx512_bf16_bf16 the AVX512_BF16 kernels'. And per ISA activations.
extern const FormatKernels generic_f32, generic_f16, generic_bf16, generic_int8, generic_int4, generic_fp8,
    generic_mxfp4, generic_nvfp4;
extern const FormatKernels avx2_f32, avx2_f16, avx2_bf16, avx2_int8, avx2_int4, avx2_fp8, avx2_mxfp4, avx2_nvfp4;
extern const FormatKernels avx512_f32, avx512_f16, avx512_bf16, avx512_int8, avx512_int4, avx512_fp8, avx512_mxfp4,
    avx512_nvfp4;
extern const FormatKernels avx512_vnni_int8, avx512_vnni_int4, avx512_vnni_mxfp4, avx512_vnni_nvfp4;
extern const FormatKernels avx512_bf16_bf16, avx512_bf16_fp8, avx512_bf16_mxfp4, avx512_bf16_nvfp4;
extern const FormatKernels amx_bf16, amx_int8, amx_int4, amx_fp8;
extern const ActivationKernels generic_activation, avx2_activation, avx512_activation;

}  // namespace lk::kernels
