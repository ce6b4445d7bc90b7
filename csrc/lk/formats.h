// How expert weights are stored: the format of a panel and where its parts lie. Shared by
// the engine (which packs panels) and the kernels (which read them).
//
// A panel holds kPanelWidth output columns over `depth` inputs, row k at k * kPanelWidth.
// Quantized formats follow the values with per-group fp32 scales (and, for INT4, offsets),
// one row of kPanelWidth per group of `group` consecutive k:
//   weight[k][j] = q[k][j] * scale[k / group][j] (+ offset[k / group][j])
#pragma once

#include <cstddef>
#include <cstdint>

#include "lk/common.h"

namespace lk {

enum class WeightFormat : int { F32 = 0, F16 = 1, BF16 = 2, Int8 = 3, Int4 = 4, Fp8E4M3 = 5 };
constexpr int kNumWeightFormats = 6;

const char* format_name(WeightFormat format);

static inline WeightFormat format_of(DType type) { return static_cast<WeightFormat>(static_cast<int>(type)); }

static inline bool is_grouped(WeightFormat format) { return static_cast<int>(format) >= static_cast<int>(WeightFormat::Int8); }

static inline bool has_offsets(WeightFormat format) { return format == WeightFormat::Int4; }

// Helpers are static so each kernel file, compiled with its own ISA flags, keeps its own
// copy instead of sharing one with baseline code.

// Bytes of the quantized values of one panel, rounded so the scales stay 64-byte aligned.
static inline std::size_t panel_value_bytes(WeightFormat format, std::size_t depth) {
  std::size_t bytes = 0;
  switch (format) {
    case WeightFormat::F32: bytes = depth * kPanelWidth * 4; break;
    case WeightFormat::F16:
    case WeightFormat::BF16: bytes = depth * kPanelWidth * 2; break;
    case WeightFormat::Int8:
    case WeightFormat::Fp8E4M3: bytes = depth * kPanelWidth; break;
    case WeightFormat::Int4: bytes = depth * kPanelWidth / 2; break;
  }
  return (bytes + 63) / 64 * 64;
}

static inline std::size_t panel_groups(std::size_t depth, std::size_t group) { return (depth + group - 1) / group; }

static inline std::size_t panel_bytes(WeightFormat format, std::size_t depth, std::size_t group) {
  std::size_t bytes = panel_value_bytes(format, depth);
  if (is_grouped(format)) {
    const std::size_t rows = panel_groups(depth, group) * (has_offsets(format) ? 2 : 1);
    bytes += rows * kPanelWidth * sizeof(float);
  }
  return bytes;
}

// INT4 packs two columns per byte: byte j of row k holds column j (low nibble) and
// column j + 8 (high nibble), so a vector of 8 bytes unpacks to columns 0-7 and 8-15.
constexpr int kInt4BytesPerRow = kPanelWidth / 2;

}  // namespace lk
