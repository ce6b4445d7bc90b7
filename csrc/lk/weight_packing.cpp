#include "lk/weight_packing.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>

#include "lk/common.h"

namespace lk {
namespace {

// The e2m1 formats as messages name them.
const char* e2m1_label(WeightFormat format) { return format == WeightFormat::Mxfp4 ? "MXFP4" : "NVFP4"; }

// Every float8_e4m3fn code converted: a table load per weight is cheaper than converting
// each (a branch for subnormals, one for the sign), and FP8 checkpoints pass every weight
// through here when converted at load.
struct Fp8Values {
  float of[256];
};
constexpr Fp8Values make_fp8_values() {
  Fp8Values values{};
  for (int code = 0; code < 256; ++code) values.of[code] = fp8_e4m3_to_float(static_cast<uint8_t>(code));
  return values;
}
constexpr Fp8Values kFp8Values = make_fp8_values();

// Fills a panel stored row by row ([depth][kPanelWidth]) from one run of `depth` Source
// values per column, converted to Stored. k outermost: each of the panel's cache lines is
// written once, where a column at a time went over the whole panel 16 times.
template <typename Source, typename Stored, typename Convert>
void store_columns(uint8_t* panel, int depth, const void* const (&columns)[kPanelWidth], Convert convert) {
  const Source* from[kPanelWidth];
  for (int j = 0; j < kPanelWidth; ++j) from[j] = static_cast<const Source*>(columns[j]);
  Stored* out = reinterpret_cast<Stored*>(panel);
  for (int k = 0; k < depth; ++k) {
    for (int j = 0; j < kPanelWidth; ++j) out[static_cast<std::size_t>(k) * kPanelWidth + j] = convert(from[j][k]);
  }
}

// Quantizes one row's `depth` floats per group of `group` into codes as the panel stores
// them (INT8: q; INT4: q ^ 8) and its scales (and offsets) at stride kPanelWidth.
void quantize_row(const float* values, int depth, WeightFormat format, int group, uint8_t* codes, float* scales,
                  float* offsets) {
  for (int begin = 0, g = 0; begin < depth; begin += group, ++g) {
    const int end = std::min(depth, begin + group);
    // Eight running minima and maxima side by side, which compilers vectorize (one chain
    // was half of a bf16 -> INT8 load).
    constexpr int kLanes = 8;
    float lanes_low[kLanes], lanes_high[kLanes];
    std::fill_n(lanes_low, kLanes, values[begin]);
    std::fill_n(lanes_high, kLanes, values[begin]);
    int next = begin;
    for (; next + kLanes <= end; next += kLanes) {
      for (int lane = 0; lane < kLanes; ++lane) {
        lanes_low[lane] = std::min(lanes_low[lane], values[next + lane]);
        lanes_high[lane] = std::max(lanes_high[lane], values[next + lane]);
      }
    }
    for (; next < end; ++next) {
      lanes_low[0] = std::min(lanes_low[0], values[next]);
      lanes_high[0] = std::max(lanes_high[0], values[next]);
    }
    const float low = *std::min_element(lanes_low, lanes_low + kLanes);
    const float high = *std::max_element(lanes_high, lanes_high + kLanes);
    if (format == WeightFormat::Int8) {  // symmetric: q in [-127, 127]
      const float scale = std::max(std::fabs(low), std::fabs(high)) / 127.0f;
      const float inverse = scale > 0.0f ? 1.0f / scale : 0.0f;
      scales[g * kPanelWidth] = scale;
      for (int k = begin; k < end; ++k) {
        const float q = std::clamp(round_to_integer(values[k] * inverse), -127.0f, 127.0f);
        codes[k] = static_cast<uint8_t>(static_cast<int8_t>(q));
      }
    } else {  // INT4, asymmetric: q in [0, 15] spans [low, high]
      const float scale = (high - low) / 15.0f;
      const float inverse = scale > 0.0f ? 1.0f / scale : 0.0f;
      scales[g * kPanelWidth] = scale;
      offsets[g * kPanelWidth] = low;
      for (int k = begin; k < end; ++k) {
        codes[k] = static_cast<uint8_t>(std::clamp(round_to_integer((values[k] - low) * inverse), 0.0f, 15.0f)) ^ 8;
      }
    }
  }
}

}  // namespace

const char* format_name(WeightFormat format) {
  switch (format) {
    case WeightFormat::F32: return "float32";
    case WeightFormat::F16: return "float16";
    case WeightFormat::BF16: return "bfloat16";
    case WeightFormat::Int8: return "int8";
    case WeightFormat::Int4: return "int4";
    case WeightFormat::Fp8E4M3: return "fp8_e4m3";
    case WeightFormat::Mxfp4: return "mxfp4";
    case WeightFormat::Nvfp4: return "nvfp4";
  }
  return "?";
}

void check_source(const WeightSource& source, const char* name) {
  if (!source.values) throw std::invalid_argument(std::string(name) + ": null values");
  if (static_cast<unsigned>(source.format) >= kNumWeightFormats) throw std::invalid_argument(std::string(name) + ": unknown format");
  if (is_e2m1(source.format)) {
    const int group = e2m1_group(source.format);
    if (source.group != group) {
      throw std::invalid_argument(std::string(name) + ": " + e2m1_label(source.format) + " groups are " +
                                  std::to_string(group) + " inputs, got group size " + std::to_string(source.group));
    }
    if (!source.scale_bytes) {
      throw std::invalid_argument(std::string(name) + ": " + format_name(source.format) + " weights need scale bytes");
    }
    if (source.format == WeightFormat::Nvfp4 && !source.row_scales) {
      throw std::invalid_argument(std::string(name) + ": nvfp4 weights need row scales");
    }
  } else if (is_grouped(source.format)) {
    if (source.group < 16 || source.group % 16 != 0) {
      throw std::invalid_argument(std::string(name) + ": group size " + std::to_string(source.group) +
                                  " must be a positive multiple of 16");
    }
    if (!source.scales || (has_offsets(source.format) && !source.offsets)) {
      throw std::invalid_argument(std::string(name) + ": " + format_name(source.format) + " weights need scales" +
                                  (has_offsets(source.format) ? " and offsets" : ""));
    }
  }
}

// e4m3fn has one NaN code (S.1111.111), which the kernels would unpack as 480. Quantizers
// saturate to +-448, so it means a damaged checkpoint: refused here, where every weight
// byte passes once anyway.
void SourceMatrix::check_fp8(std::size_t row, std::size_t first_col, int depth) const {
  const uint8_t* bytes = row_bytes(row, 1) + first_col;
  bool any_nan = false;  // a loop without an exit, which compilers vectorize
  for (int k = 0; k < depth; ++k) any_nan |= (bytes[k] & 0x7f) == 0x7f;
  for (int k = 0; any_nan && k < depth; ++k) {
    if ((bytes[k] & 0x7f) == 0x7f) {
      throw std::invalid_argument("expert " + std::to_string(expert) + ", row " + std::to_string(row) + ", input " +
                                  std::to_string(first_col + k) + " holds a float8_e4m3fn NaN; lk needs finite weights");
    }
  }
}

uint8_t SourceMatrix::scale_byte(std::size_t row, std::size_t col) const {
  const std::size_t group = e2m1_group(source.format);
  if (cols % group != 0) {
    throw std::invalid_argument(std::string(e2m1_label(source.format)) + " weights come in whole groups of " +
                                std::to_string(group) + " inputs; got rows of " + std::to_string(cols));
  }
  const uint8_t scale = source.scale_bytes[meta_index(row, col)];
  const bool mxfp4 = source.format == WeightFormat::Mxfp4;
  if (mxfp4 ? scale == 0xff : (scale & 0x7f) == 0x7f) {
    const std::size_t first = col / group * group;
    throw std::invalid_argument("expert " + std::to_string(expert) + ", row " + std::to_string(row) + ", inputs " +
                                std::to_string(first) + "-" + std::to_string(first + group - 1) + " have " +
                                (mxfp4 ? "the e8m0 NaN scale (255)" : "a float8_e4m3fn NaN scale") +
                                "; lk needs finite weights");
  }
  return scale;
}

float SourceMatrix::row_scale(std::size_t row) const {
  const float scale = source.row_scales[expert * rows + row];
  if (!(std::fabs(scale) < kNvfp4RowScaleLimit)) {
    throw std::invalid_argument("expert " + std::to_string(expert) + ", row " + std::to_string(row) +
                                " has a weight_scale_2 of " + std::to_string(scale) +
                                "; lk takes finite ones below 2^20 in magnitude");
  }
  return scale;
}

void SourceMatrix::read_floats(std::size_t row, std::size_t first_col, int depth, float* out) const {
  switch (source.format) {
    case WeightFormat::F32:
      std::memcpy(out, reinterpret_cast<const float*>(row_bytes(row, 4)) + first_col, depth * sizeof(float));
      return;
    case WeightFormat::F16: {
      const uint16_t* values = reinterpret_cast<const uint16_t*>(row_bytes(row, 2)) + first_col;
      for (int k = 0; k < depth; ++k) out[k] = f16_to_float(values[k]);
      return;
    }
    case WeightFormat::BF16: {  // one loop per type, so the compiler vectorizes it
      const uint16_t* values = reinterpret_cast<const uint16_t*>(row_bytes(row, 2)) + first_col;
      for (int k = 0; k < depth; ++k) out[k] = bf16_to_float(values[k]);
      return;
    }
    case WeightFormat::Fp8E4M3:
      check_fp8(row, first_col, depth);
      break;
    case WeightFormat::Mxfp4:    // twice each code's value times 2^(e - 128), exact
    case WeightFormat::Nvfp4: {  // times e4m3 x half row scale, rounded once as the kernels do
      const uint8_t* codes = code_bytes(row);
      const std::size_t group = e2m1_group(source.format);
      const float half_row = source.format == WeightFormat::Nvfp4 ? row_scale(row) * 0.5f : 0.0f;
      for (int k = 0; k < depth;) {
        const std::size_t col = first_col + k;
        const int end = static_cast<int>(std::min<std::size_t>(depth, (col / group + 1) * group - first_col));
        const uint8_t byte = scale_byte(row, col);
        const float scale = source.format == WeightFormat::Mxfp4 ? std::ldexp(1.0f, byte - 128)
                                                                 : kFp8Values.of[byte] * half_row;
        for (; k < end; ++k) {
          const std::size_t at = first_col + k;
          out[k] = kMxfp4Doubled[(codes[at / 2] >> (4 * (at & 1))) & 0xf] * scale;
        }
      }
      return;
    }
    case WeightFormat::Int8:
    case WeightFormat::Int4:
      break;
  }
  // Grouped sources: one scale (and offset) per run of inputs within a source group.
  const uint8_t* bytes = row_bytes(row, 1);
  for (int k = 0; k < depth;) {
    const std::size_t col = first_col + k;
    const int end = static_cast<int>(std::min<std::size_t>(depth, (col / source.group + 1) * source.group - first_col));
    const float scale = source.scales[meta_index(row, col)];
    if (source.format == WeightFormat::Int8) {
      for (; k < end; ++k) out[k] = static_cast<int8_t>(bytes[first_col + k]) * scale;
    } else if (source.format == WeightFormat::Int4) {
      const float offset = source.offsets[meta_index(row, col)];
      for (; k < end; ++k) out[k] = bytes[first_col + k] * scale + offset;
    } else {
      for (; k < end; ++k) out[k] = kFp8Values.of[bytes[first_col + k]] * scale;
    }
  }
}

namespace {

// INT4 and e2m1 codes, [kPanelWidth][stride], into a panel's values: a byte holds column j
// in its low nibble and j + 8 in its high one (formats.h, int4_byte).
void interleave_nibbles(const uint8_t* codes, std::size_t stride, int depth, uint8_t* panel) {
  for (int k = 0; k < depth; ++k) {
    for (int j = 0; j < kPanelWidth / 2; ++j) {
      int shift;
      panel[int4_byte(k, j, &shift)] =
          static_cast<uint8_t>(codes[j * stride + k] | codes[(j + kPanelWidth / 2) * stride + k] << 4);
    }
  }
}

// INT8 and INT4: each column's codes and group scales (copied, or quantized from floats),
// then the codes interleaved as the format stores them.
void pack_integer_panel(const SourceMatrix& source, const int (&rows)[kPanelWidth], std::size_t first_col, int depth,
                        WeightFormat format, int group, bool same, PackScratch& scratch, uint8_t* panel) {
  const std::size_t groups = panel_groups(depth, group);
  float* scales = reinterpret_cast<float*>(panel + panel_value_bytes(format, depth));
  float* offsets = scales + groups * kPanelWidth;
  scratch.floats.resize(depth);
  const std::size_t stride = padded_depth(format, depth);
  scratch.codes.assign(stride * kPanelWidth, 0);
  for (int j = 0; j < kPanelWidth; ++j) {
    if (rows[j] < 0) continue;
    uint8_t* codes = scratch.codes.data() + j * stride;
    if (same) {
      const uint8_t* from = source.row_bytes(rows[j], 1) + first_col;
      for (int k = 0; k < depth; ++k) codes[k] = format == WeightFormat::Int4 ? (from[k] & 0xf) ^ 8 : from[k];
      for (std::size_t g = 0; g < groups; ++g) {
        const std::size_t meta = source.meta_index(rows[j], first_col + g * group);
        scales[g * kPanelWidth + j] = source.source.scales[meta];
        if (has_offsets(format)) offsets[g * kPanelWidth + j] = source.source.offsets[meta];
      }
    } else {
      source.read_floats(rows[j], first_col, depth, scratch.floats.data());
      quantize_row(scratch.floats.data(), depth, format, group, codes, scales + j, offsets + j);
    }
  }
  const uint8_t* codes = scratch.codes.data();
  if (format == WeightFormat::Int4) {
    interleave_nibbles(codes, stride, depth, panel);
    return;
  }
  for (int k = 0; k < depth; ++k) {
    for (int j = 0; j < kPanelWidth; ++j) panel[int8_offset(k, j)] = codes[j * stride + k];
  }
}

// MXFP4 or NVFP4 from the same (the engine converts them to other formats, never others to
// them): each column's codes out of their bytes, its scale bytes (NaN refused; MXFP4's as
// they are, NVFP4's magnitudes re-coded and a negative scale's group negated, formats.h),
// NVFP4's half row scale times the codes' unit, then the codes where INT4's nibbles lie.
void pack_e2m1_panel(const SourceMatrix& source, const int (&rows)[kPanelWidth], std::size_t first_col, int depth,
                     PackScratch& scratch, uint8_t* panel) {
  const WeightFormat format = source.source.format;
  const int group = e2m1_group(format);
  // The kernels multiply whole groups; rows split between nodes split on group ends.
  if (depth % group != 0) throw std::logic_error("an e2m1 panel must hold whole groups of inputs");
  const std::size_t groups = panel_groups(depth, group);
  const std::size_t value_bytes = panel_value_bytes(format, depth);
  uint8_t* scales = panel + value_bytes;
  float* half_row_scales = reinterpret_cast<float*>(panel + row_scale_line(value_bytes, groups * kPanelWidth));
  const std::size_t stride = padded_depth(format, depth);
  scratch.codes.assign(stride * kPanelWidth, 0);
  for (int j = 0; j < kPanelWidth; ++j) {
    if (rows[j] < 0) continue;
    if (format == WeightFormat::Nvfp4) half_row_scales[j] = source.row_scale(rows[j]) * 0.5f * kNvfp4ScaleCodeUnit;
    const uint8_t* from = source.code_bytes(rows[j]);
    uint8_t* codes = scratch.codes.data() + j * stride;
    for (std::size_t g = 0; g < groups; ++g) {
      uint8_t scale = source.scale_byte(rows[j], first_col + g * group);
      uint8_t sign_flip = 0;
      if (format == WeightFormat::Nvfp4) {
        sign_flip = (scale & 0x80) ? 0x8 : 0;  // e2m1's sign bit
        scale = nvfp4_scale_code(kFp8Values.of[scale & 0x7f]);
      }
      scales[g * kPanelWidth + j] = scale;
      for (int k = static_cast<int>(g) * group; k < static_cast<int>(g + 1) * group; ++k) {
        const std::size_t at = first_col + k;
        codes[k] = ((from[at / 2] >> (4 * (at & 1))) & 0xf) ^ sign_flip;
      }
    }
  }
  interleave_nibbles(scratch.codes.data(), stride, depth, panel);
}

// FP8 and the float formats: row k of the panel at k * kPanelWidth, copied, or converted
// from floats. Columns without a source row read zeros.
void pack_row_major_panel(const SourceMatrix& source, const int (&rows)[kPanelWidth], std::size_t first_col,
                          int depth, WeightFormat format, int group, bool same, PackScratch& scratch, uint8_t* panel) {
  // Nothing writes to it, so it is zeroed only when it grows.
  const std::size_t zero_bytes = static_cast<std::size_t>(depth) * sizeof(float);
  if (scratch.zeros.size() < zero_bytes) scratch.zeros.assign(zero_bytes, 0);
  const void* columns[kPanelWidth];
  const auto keep = [](auto value) { return value; };
  if (same) {
    const std::size_t groups = is_grouped(format) ? panel_groups(depth, group) : 0;
    float* scales = reinterpret_cast<float*>(panel + panel_value_bytes(format, depth));
    const std::size_t element = format == WeightFormat::F32 ? 4 : format == WeightFormat::Fp8E4M3 ? 1 : 2;
    for (int j = 0; j < kPanelWidth; ++j) {
      if (rows[j] < 0) {
        columns[j] = scratch.zeros.data();
        continue;
      }
      columns[j] = source.row_bytes(rows[j], element) + first_col * element;
      if (format == WeightFormat::Fp8E4M3) {
        source.check_fp8(rows[j], first_col, depth);
        for (std::size_t g = 0; g < groups; ++g) {
          scales[g * kPanelWidth + j] = source.source.scales[source.meta_index(rows[j], first_col + g * group)];
        }
      }
    }
    if (element == 1) store_columns<uint8_t, uint8_t>(panel, depth, columns, keep);
    if (element == 2) store_columns<uint16_t, uint16_t>(panel, depth, columns, keep);
    if (element == 4) store_columns<float, float>(panel, depth, columns, keep);
    return;
  }
  scratch.floats.resize(static_cast<std::size_t>(depth) * kPanelWidth);
  for (int j = 0; j < kPanelWidth; ++j) {
    float* column = scratch.floats.data() + static_cast<std::size_t>(j) * depth;
    columns[j] = rows[j] < 0 ? static_cast<const void*>(scratch.zeros.data()) : column;
    if (rows[j] >= 0) source.read_floats(rows[j], first_col, depth, column);
  }
  switch (format) {
    case WeightFormat::F32: store_columns<float, float>(panel, depth, columns, keep); break;
    case WeightFormat::F16: store_columns<float, uint16_t>(panel, depth, columns, float_to_f16); break;
    case WeightFormat::BF16: store_columns<float, uint16_t>(panel, depth, columns, float_to_bf16); break;
    default: break;
  }
}

}  // namespace

void pack_panel(const SourceMatrix& source, const int (&rows)[kPanelWidth], std::size_t first_col, int depth,
                WeightFormat format, int group, PackScratch& scratch, uint8_t* panel) {
  const bool same = source.source.format == format && (!is_grouped(format) || source.source.group == group);
  if (!same && format == WeightFormat::Fp8E4M3) throw std::invalid_argument("the engine stores FP8 only from FP8 weights");
  if (is_e2m1(format) && group != e2m1_group(format)) {
    throw std::invalid_argument(std::string(e2m1_label(format)) + " groups are " + std::to_string(e2m1_group(format)) +
                                " inputs, got group size " + std::to_string(group));
  }
  if (!same && is_e2m1(format)) {
    throw std::invalid_argument(std::string("the engine stores ") + e2m1_label(format) + " only from " +
                                e2m1_label(format) + " weights");
  }
  // Padding (columns without a row, inputs past `depth` up to a block) stays zero.
  std::memset(panel, 0, panel_bytes(format, depth, group));
  if (is_e2m1(format)) {
    pack_e2m1_panel(source, rows, first_col, depth, scratch, panel);
  } else if (format == WeightFormat::Int8 || format == WeightFormat::Int4) {
    pack_integer_panel(source, rows, first_col, depth, format, group, same, scratch, panel);
  } else {
    pack_row_major_panel(source, rows, first_col, depth, format, group, same, scratch, panel);
  }
}

void pack_on_workers(Runtime& runtime, std::vector<uint32_t> tasks_per_node,
                     const std::function<void(int node, uint32_t task)>& pack) {
  std::vector<std::string> errors(runtime.executor().num_threads());
  Phase phase{std::move(tasks_per_node), [&](int node, uint32_t task, int worker) {
                try {
                  pack(node, task);
                } catch (const std::exception& error) {
                  errors[worker] = error.what();
                }
              }};
  std::vector<Phase> job;
  job.push_back(std::move(phase));
  {
    std::lock_guard<std::mutex> lock(runtime.submit_mutex());
    runtime.executor().run(std::move(job));
  }
  for (const std::string& error : errors) {
    if (!error.empty()) throw std::invalid_argument(error);
  }
}

}  // namespace lk
