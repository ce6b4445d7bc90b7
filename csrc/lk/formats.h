// How expert weights are stored: the format of a panel and where its parts lie. Shared by
// the engine (which packs panels) and the kernels (which read them).
//
// A panel holds kPanelWidth output columns over `depth` inputs. Float formats and FP8 store
// row k at k * kPanelWidth. INT8 and INT4 interleave consecutive rows (below), so a 16-bit
// lane can hold one column's weights for two inputs, as integer multiply-add instructions
// want them. Quantized formats follow the values with per-group fp32 scales (and, for INT4,
// offsets), one row of kPanelWidth per group of `group` consecutive k:
//   weight[k][j] = q[k][j] * scale[k / group][j] (+ offset[k / group][j])
// MXFP4 and NVFP4 store their scales as bytes, one per column and group (below).
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "lk/common.h"

namespace lk {

enum class WeightFormat : int { F32 = 0, F16 = 1, BF16 = 2, Int8 = 3, Int4 = 4, Fp8E4M3 = 5, Mxfp4 = 6, Nvfp4 = 7 };
constexpr int kNumWeightFormats = 8;

const char* format_name(WeightFormat format);

// Helpers are static so each kernel file, compiled with its own ISA flags, keeps its own
// copy instead of sharing one with baseline code.

static constexpr bool is_grouped(WeightFormat format) { return static_cast<int>(format) >= static_cast<int>(WeightFormat::Int8); }

static constexpr bool has_offsets(WeightFormat format) { return format == WeightFormat::Int4; }

// INT8 stores rows in pairs (k even): byte 2j + (k & 1) of pair k / 2 is q[k][j].
// INT4 stores rows in fours (k a multiple of 4) as kPanelWidth 16-bit words: nibble s of
// word i is q[k + 2 * (s >> 1) + (i & 1)][(i >> 1) + 8 * (s & 1)] - 8 as a signed 4-bit
// value, so two shifts of the words give pairs of rows for 8 columns, sign-extended; the
// kernels add 8 * scale to the offset. Centred values keep the integer dot products (and
// the rounding of the activations in them) small. A panel's depth is padded to whole pairs
// or fours with zero values.
// Read as bytes, the 32-bit lane of columns j and j + 8 (words 2j and 2j + 1) holds
// inputs k, k + 2, k + 1, k + 3 in that order, column j in the low nibbles and j + 8 in
// the high ones: kInt4QuadOrder[i] is the byte of input k + i.
constexpr int kInt4QuadOrder[4] = {0, 2, 1, 3};
constexpr int kInt8RowsPerBlock = 2;
constexpr int kInt4RowsPerBlock = 4;
constexpr int kInt4BytesPerBlock = kInt4RowsPerBlock * kPanelWidth / 2;

// MXFP4 (OCP microscaling, as gpt-oss ships it): each weight an e2m1 code (sign bit 3, then
// two exponent bits and one mantissa bit: +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}), each group of
// kMxfp4Group inputs sharing an e8m0 scale byte e (2^(e - 127); 255 is NaN, refused at
// load). The codes lie where INT4's nibbles do (int4_byte), as they are (no XOR), so a
// block of four rows is read as INT4's is; a 16-entry byte lookup (vpshufb) turns them into
// twice their value, small integers (kMxfp4Doubled) that the integer kernels multiply as
// INT4's. The scale rows after the values are the e8m0 bytes, kPanelWidth per group (a
// sixteenth of fp32 scales' bytes: 4.25 bits per weight, as in the checkpoint); a kernel
// turns a row into fp32 halves of the scales, 2^(e - 128), with one shift per lane (e = 0,
// 2^-127, then reads as 0: such weights are below 2^-124).
constexpr int kMxfp4Group = 32;
constexpr int8_t kMxfp4Doubled[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
// NVFP4 (NVIDIA ModelOpt): the same codes, lying as MXFP4's do, each group of kNvfp4Group
// inputs sharing an FP8 e4m3fn scale byte, and each row (column of a panel) a float32
// scale, the checkpoint's per-tensor weight_scale_2. The scale rows hold a byte per column
// and group, the e4m3 scale's magnitude re-coded (nvfp4_scale_code) so that the code shifted
// left by 20 is the fp32 bits of the scale times 2^-104, subnormal e4m3 included (a widening
// and a shift in the kernels). A negative scale's group has its codes' signs flipped instead
// (exact). The panel ends with a line of the columns' row scales halved (for
// the doubled values) times 2^104 (kNvfp4ScaleCodeUnit): a group's scale is the code's fp32
// x that row scale, rounded once, as e4m3 x half row scale is.
constexpr int kNvfp4Group = 16;
constexpr int kNvfp4ScaleCodeShift = 20;
constexpr float kNvfp4ScaleCodeUnit = 0x1p104f;
constexpr uint32_t kNvfp4ScaleCodeExponent = (std::bit_cast<uint32_t>(kNvfp4ScaleCodeUnit) >> 23) - 127;
// Row scales whose half times kNvfp4ScaleCodeUnit stays finite, with room for the products.
constexpr float kNvfp4RowScaleLimit = 0x1p20f;

// The formats whose values are e2m1 codes (multiplied as INT4's, doubled), and their group.
static constexpr bool is_e2m1(WeightFormat format) {
  return format == WeightFormat::Mxfp4 || format == WeightFormat::Nvfp4;
}
static constexpr int e2m1_group(WeightFormat format) {
  return format == WeightFormat::Mxfp4 ? kMxfp4Group : kNvfp4Group;
}

static constexpr int rows_per_block(WeightFormat format) {
  return format == WeightFormat::Int8                             ? kInt8RowsPerBlock
         : format == WeightFormat::Int4 || is_e2m1(format) ? kInt4RowsPerBlock
                                                                  : 1;
}

// Bytes of a panel's row of scales for one group: fp32, or the e2m1 formats' scale bytes.
static constexpr int group_row_bytes(WeightFormat format) {
  return is_e2m1(format) ? kPanelWidth : kPanelWidth * static_cast<int>(sizeof(float));
}

// The scale an MXFP4 group's doubled values (kMxfp4Doubled) are multiplied by, 2^(e - 128),
// as the kernels compute it (e = 0 gives 0).
static inline float mxfp4_half_scale(uint8_t e8m0) {
  const uint32_t bits = static_cast<uint32_t>(e8m0) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return scale * 0.5f;
}

// A non-negative e4m3 value (every one is a multiple of 2^-9 with at most 4 significant
// bits) as its NVFP4 scale code: its fp32 exponent and top 3 mantissa bits, the exponent
// lowered by kNvfp4ScaleCodeExponent (codes 112..254 for 2^-9..448), or 0 for zero.
static inline uint8_t nvfp4_scale_code(float magnitude) {
  if (magnitude == 0.0f) return 0;
  uint32_t bits;
  std::memcpy(&bits, &magnitude, sizeof bits);
  return static_cast<uint8_t>((bits >> kNvfp4ScaleCodeShift) - (kNvfp4ScaleCodeExponent << 3));
}

// An NVFP4 scale code's value times 2^-104, as the kernels compute it.
static inline float nvfp4_code_scale(uint8_t code) {
  const uint32_t bits = static_cast<uint32_t>(code) << kNvfp4ScaleCodeShift;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return scale;
}

static constexpr std::size_t padded_depth(WeightFormat format, std::size_t depth) {
  const std::size_t block = rows_per_block(format);
  return (depth + block - 1) / block * block;
}

// Bytes of one block of rows_per_block(format) rows.
static constexpr int block_bytes(WeightFormat format) {
  switch (format) {
    case WeightFormat::F32: return kPanelWidth * 4;
    case WeightFormat::F16:
    case WeightFormat::BF16: return kPanelWidth * 2;
    case WeightFormat::Int8: return kInt8RowsPerBlock * kPanelWidth;
    case WeightFormat::Int4:
    case WeightFormat::Mxfp4:
    case WeightFormat::Nvfp4: return kInt4BytesPerBlock;
    case WeightFormat::Fp8E4M3: return kPanelWidth;
  }
  return 0;
}

// Where q[k][j] lies in an INT8 panel's values.
static inline std::size_t int8_offset(std::size_t k, int j) {
  return (k / kInt8RowsPerBlock) * kInt8RowsPerBlock * kPanelWidth + 2 * j + (k & 1);
}

// Where q[k][j] - 8 lies in an INT4 panel's values: its byte, and the shift of its nibble.
static inline std::size_t int4_byte(std::size_t k, int j, int* shift) {
  const int within = static_cast<int>(k % kInt4RowsPerBlock);
  const int word = 2 * (j % 8) + (within & 1);
  const int nibble = 2 * (within >> 1) + j / 8;
  *shift = 4 * (nibble & 1);
  return (k / kInt4RowsPerBlock) * kInt4BytesPerBlock + 2 * word + (nibble >> 1);
}

// Bytes of the quantized values of one panel, rounded so the scales stay 64-byte aligned.
static inline std::size_t panel_value_bytes(WeightFormat format, std::size_t depth) {
  const std::size_t bytes = padded_depth(format, depth) / rows_per_block(format) * block_bytes(format);
  return (bytes + 63) / 64 * 64;
}

static inline std::size_t panel_groups(std::size_t depth, std::size_t group) { return (depth + group - 1) / group; }

// Where NVFP4's line of half row scales starts, `group_rows_bytes` after the values: the
// next whole line.
static inline std::size_t row_scale_line(std::size_t value_bytes, std::size_t group_rows_bytes) {
  return value_bytes + (group_rows_bytes + 63) / 64 * 64;
}

// Whole 64-byte lines, so that every panel of a run starts one (the e2m1 formats' scale
// rows are a quarter line each).
static inline std::size_t panel_bytes(WeightFormat format, std::size_t depth, std::size_t group) {
  std::size_t bytes = panel_value_bytes(format, depth);
  if (is_grouped(format)) {
    const std::size_t rows = panel_groups(depth, group) * (has_offsets(format) ? 2 : 1);
    bytes += rows * group_row_bytes(format);
  }
  bytes = (bytes + 63) / 64 * 64;
  return format == WeightFormat::Nvfp4 ? bytes + 64 : bytes;
}

}  // namespace lk
