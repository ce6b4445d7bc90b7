#include "lk/moe_engine.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <numeric>
#include <stdexcept>
#include <string>
#include <utility>

namespace lk {
namespace {

// Most rows handed to one kernel call (a format's kernels take chunk_rows); bounds the
// per-worker tile buffers.
constexpr int kMaxChunkRows = kernels::kMaxPanelRows;
// Tokens per task when converting the input and combining the nodes' outputs.
constexpr int kTokenBlock = 16;
// A task walks up to this many consecutive panels of one expert, which lie next to each
// other: each thread then reads runs of 96 KiB-1 MiB instead of single panels interleaved
// with the other threads' claims (two threads streaming 24 KiB pieces: 28 GB/s claimed one
// by one, 32 GB/s as runs, on the 2-core Zen 3; runs of 8 panels against 4 then gained
// INT4 decode 3%, the other formats 0-1%). Where tile kernels take an expert's rows, a
// task packs them for its whole run, and runs go up to all of the expert's panels (capped
// at 8, a bf16 layer of 1024 tokens spent 17% of its time packing the same rows again).
// Runs shrink until every thread has at least kTasksPerThread tasks, so dynamic claiming
// still evens out the end of a phase.
constexpr int kRunPanels = 8;
constexpr std::size_t kTasksPerThread = 8;

// Panels per task when `panels` are split into runs of at most `longest` for `threads`
// threads.
int run_length(std::size_t tasks_at_one_panel, int panels, int threads, int longest = kRunPanels) {
  const std::size_t fit = tasks_at_one_panel / (kTasksPerThread * static_cast<std::size_t>(threads));
  return static_cast<int>(std::clamp<std::size_t>(fit, 1, std::max(1, std::min(longest, panels))));
}

std::size_t round_up(std::size_t value, std::size_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// Splits `count` tasks that may run anywhere evenly over the nodes.
std::vector<uint32_t> spread(uint32_t count, int nodes) {
  std::vector<uint32_t> per_node(nodes);
  for (int n = 0; n < nodes; ++n) per_node[n] = count * (n + 1ull) / nodes - count * 1ull * n / nodes;
  return per_node;
}

uint32_t spread_offset(uint32_t count, int nodes, int node) {
  return static_cast<uint32_t>(count * 1ull * node / nodes);
}

// Every float8_e4m3fn code decoded: a table load per weight is cheaper than decoding
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

// One expert's source matrix, read a row segment at a time.
struct SourceMatrix {
  const WeightSource& source;
  std::size_t rows, cols;
  std::size_t expert;

  std::size_t groups() const { return (cols + source.group - 1) / source.group; }
  std::size_t meta_index(std::size_t row, std::size_t col) const {
    return (expert * rows + row) * groups() + col / source.group;
  }
  const uint8_t* row_bytes(std::size_t row, std::size_t element_bytes) const {
    return static_cast<const uint8_t*>(source.values) + (expert * rows + row) * cols * element_bytes;
  }

  // e4m3fn has one NaN code (S.1111.111), which the kernels would decode as 480. Quantizers
  // saturate to +-448, so it means a damaged checkpoint: refused here, where every weight
  // byte passes once anyway.
  void check_fp8(std::size_t row, std::size_t first_col, int depth) const {
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

  // Inputs [first_col, first_col + depth) of `row` as floats, dequantized where needed.
  void read_floats(std::size_t row, std::size_t first_col, int depth, float* out) const {
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
};

// What packing one panel needs besides the panel: a source row as floats, and the panel's
// columns as stored integer codes, [kPanelWidth][depth rounded up to a block].
struct PackScratch {
  std::vector<float> floats;
  std::vector<uint8_t> codes;
  std::vector<uint8_t> zeros;
};

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

// Writes one panel: columns j < kPanelWidth are source rows rows[j] (-1: zero padding),
// inputs k are source columns first_col + k. Same formats (and groups) copy exactly;
// otherwise values are read as floats and stored or quantized per group.
void pack_panel(const SourceMatrix& source, const int (&rows)[kPanelWidth], std::size_t first_col, int depth,
                WeightFormat format, int group, PackScratch& scratch, uint8_t* panel) {
  const std::size_t groups = is_grouped(format) ? panel_groups(depth, group) : 0;
  float* scales = reinterpret_cast<float*>(panel + panel_value_bytes(format, depth));
  float* offsets = scales + groups * kPanelWidth;
  const bool same = source.source.format == format && (!is_grouped(format) || source.source.group == group);
  if (!same && format == WeightFormat::Fp8E4M3) throw std::invalid_argument("the engine stores FP8 only from FP8 weights");
  // Padding (columns without a row, inputs past `depth` up to a block) stays zero.
  std::memset(panel, 0, panel_bytes(format, depth, group));
  if (format == WeightFormat::Int8 || format == WeightFormat::Int4) {
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
    for (int k = 0; k < depth; ++k) {
      if (format == WeightFormat::Int8) {
        for (int j = 0; j < kPanelWidth; ++j) panel[int8_offset(k, j)] = codes[j * stride + k];
      } else {  // a byte holds column j in its low nibble and j + 8 in its high one
        for (int j = 0; j < kPanelWidth / 2; ++j) {
          int shift;
          panel[int4_byte(k, j, &shift)] =
              static_cast<uint8_t>(codes[j * stride + k] | codes[(j + kPanelWidth / 2) * stride + k] << 4);
        }
      }
    }
    return;
  }
  // FP8 and float formats store row k of the panel at k * kPanelWidth. Columns without a
  // source row read zeros.
  // Nothing writes to it, so it is zeroed only when it grows.
  const std::size_t zero_bytes = static_cast<std::size_t>(depth) * sizeof(float);
  if (scratch.zeros.size() < zero_bytes) scratch.zeros.assign(zero_bytes, 0);
  const void* columns[kPanelWidth];
  const auto keep = [](auto value) { return value; };
  if (same) {
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

// Activation rows quantized for the integer kernels (kernels::ActivationRow), one record
// per row: int16 values, zero up to a multiple of 16; for 8-bit formats the same values as
// bytes in quad order; per group its scale and its exact fp32 sum; for 8-bit formats the
// sums of the values per span. Every ISA reads the same records, so they all multiply the
// same integers.
class QuantizedRows {
 public:
  QuantizedRows(WeightFormat format, int depth, int group)
      : largest_(kernels::activation_max(format)), bytes_(largest_ <= 127), depth_(depth), group_(group),
        groups_(static_cast<int>(panel_groups(depth, group))), spans_(groups_ * kernels::spans_per_group(group)),
        stride_(static_cast<int>(round_up(depth, 16))) {}

  std::size_t bytes(std::size_t rows) const { return rows * record_bytes(); }

  int groups() const { return groups_; }

  void quantize(const float* x, void* records, std::size_t row) const {
    for (int g = 0; g < groups_; ++g) quantize_group(x, records, row, g);
  }

  // Group g of the row; the last group also zeroes the padding after it.
  void quantize_group(const float* x, void* records, std::size_t row, int g) const {
    const Record record = at(records, row);
    const int begin = g * group_, end = std::min(depth_, begin + group_);
    // Eight lanes of maxima and sums, then the lanes in order (the same total on every
    // machine): a single running sum and maximum were chains of dependent operations, 4
    // cycles a value, 5% of a 1024-token INT8 layer.
    constexpr int kLanes = 8;
    float lane_largest[kLanes] = {}, lane_total[kLanes] = {};
    int k = begin;
    for (; k + kLanes <= end; k += kLanes) {
      for (int i = 0; i < kLanes; ++i) {
        lane_largest[i] = std::max(lane_largest[i], std::fabs(x[k + i]));
        lane_total[i] += x[k + i];
      }
    }
    float largest = 0.0f, total = 0.0f;
    for (int i = 0; i < kLanes; ++i) {
      largest = std::max(largest, lane_largest[i]);
      total += lane_total[i];
    }
    for (; k < end; ++k) {
      largest = std::max(largest, std::fabs(x[k]));
      total += x[k];
    }
    // A NaN or infinity makes the group's total non-finite; its scale then carries a NaN
    // into the outputs, as the fp32 kernels would.
    const bool finite = std::isfinite(total);
    const float inverse = finite && largest > 0.0f ? largest_ / largest : 0.0f;
    record.scale[g] = finite ? largest / largest_ : std::numeric_limits<float>::quiet_NaN();
    record.sum[g] = total;
    int16_t* q = record.q;
    for (k = begin; k < end; ++k) q[k] = finite ? static_cast<int16_t>(round_to_integer(x[k] * inverse)) : 0;
    const int padded_end = g == groups_ - 1 ? stride_ : end;
    std::fill(q + end, q + padded_end, int16_t{0});
    if (!bytes_) return;
    // Groups are multiples of 16 inputs, so a group holds whole quads.
    for (int k = begin; k < padded_end; ++k) record.quads[(k & ~3) + kInt4QuadOrder[k & 3]] = static_cast<int8_t>(q[k]);
    for (int first = begin; first < end; first += kernels::kIntegerSpan) {
      const int last = std::min(end, first + kernels::kIntegerSpan);
      record.span_sums[kernels::span_index(group_, g, first - begin)] = std::accumulate(q + first, q + last, int32_t{0});
    }
  }

  kernels::ActivationRow row(const float* x, const void* records, std::size_t row) const {
    const Record record = at(records, row);
    return {x, record.q, record.scale, record.sum, record.quads, record.span_sums};
  }

 private:
  struct Record {
    int16_t* q;
    int8_t* quads;
    float* scale;
    float* sum;
    int32_t* span_sums;
  };

  std::size_t record_bytes() const {
    return stride_ * sizeof(int16_t) + 2 * groups_ * sizeof(float) +
           (bytes_ ? stride_ * sizeof(int8_t) + spans_ * sizeof(int32_t) : 0);
  }
  Record at(const void* records, std::size_t row) const {
    char* base = static_cast<char*>(const_cast<void*>(records)) + row * record_bytes();
    Record record{};
    record.q = reinterpret_cast<int16_t*>(base);
    record.scale = reinterpret_cast<float*>(base + stride_ * sizeof(int16_t));
    record.sum = record.scale + groups_;
    if (bytes_) {
      record.span_sums = reinterpret_cast<int32_t*>(record.sum + groups_);
      record.quads = reinterpret_cast<int8_t*>(record.span_sums + spans_);
    }
    return record;
  }

  int largest_;
  bool bytes_;
  int depth_, group_, groups_, spans_, stride_;
};

}  // namespace

const char* format_name(WeightFormat format) {
  switch (format) {
    case WeightFormat::F32: return "float32";
    case WeightFormat::F16: return "float16";
    case WeightFormat::BF16: return "bfloat16";
    case WeightFormat::Int8: return "int8";
    case WeightFormat::Int4: return "int4";
    case WeightFormat::Fp8E4M3: return "fp8_e4m3";
  }
  return "?";
}

namespace {

void check_source(const WeightSource& source, const char* name) {
  if (!source.values) throw std::invalid_argument(std::string(name) + ": null values");
  if (static_cast<unsigned>(source.format) >= kNumWeightFormats) throw std::invalid_argument(std::string(name) + ": unknown format");
  if (is_grouped(source.format)) {
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

}  // namespace

MoEEngine::MoEEngine(std::shared_ptr<Runtime> runtime, const WeightSource& w13, const WeightSource& w2,
                     const ExpertShape& shape)
    : runtime_(std::move(runtime)), shape_(shape) {
  if (!runtime_) throw std::invalid_argument("runtime is null");
  if (shape.experts < 1 || shape.hidden < 1 || shape.intermediate < 1) {
    throw std::invalid_argument("experts, hidden and intermediate sizes must be >= 1, got E=" +
                                std::to_string(shape.experts) + " H=" + std::to_string(shape.hidden) +
                                " I=" + std::to_string(shape.intermediate));
  }
  if (static_cast<unsigned>(shape.activation) > static_cast<unsigned>(Activation::SwigluOai)) {
    throw std::invalid_argument("unknown activation");
  }
  if (static_cast<unsigned>(shape.format) >= kNumWeightFormats) throw std::invalid_argument("unknown weight format");
  if (is_grouped(shape.format) && (shape.group_size < 16 || shape.group_size % 16 != 0)) {
    throw std::invalid_argument("group size " + std::to_string(shape.group_size) + " must be a positive multiple of 16");
  }
  check_source(w13, "w13");
  check_source(w2, "w2");
  hidden_panels_ = static_cast<int>(round_up(shape.hidden, kPanelWidth) / kPanelWidth);
  hidden_stride_ = hidden_panels_ * kPanelWidth;
  const std::vector<IntermediateRows> rows = split_intermediate(shape, runtime_->topology().num_nodes());
  slices_.resize(rows.size());
  for (std::size_t n = 0; n < rows.size(); ++n) {
    NodeSlice& slice = slices_[n];
    static_cast<IntermediateRows&>(slice) = rows[n];
    slice.gate_up = HostBuffer(static_cast<std::size_t>(shape.experts) * 2 * slice.panels * gate_up_panel_bytes(slice));
    slice.down = HostBuffer(static_cast<std::size_t>(shape.experts) * hidden_panels_ * down_panel_bytes(slice));
  }
  pack(w13, w2);
}

std::vector<IntermediateRows> split_intermediate(const ExpertShape& shape, int nodes) {
  // The source's groups do not matter: a source in another format or group size is
  // requantized value by value, so the split, and with it the order of the sums, depends on
  // the stored format alone.
  std::size_t align = kPanelWidth;
  if (is_grouped(shape.format)) align = std::lcm(align, shape.group_size);
  const int units = static_cast<int>(round_up(shape.intermediate, align) / align);
  std::vector<IntermediateRows> rows(nodes);
  for (int n = 0; n < nodes; ++n) {
    const int first = static_cast<int>(units * 1ll * n / nodes), last = static_cast<int>(units * (n + 1ll) / nodes);
    rows[n].begin = static_cast<int>(std::min<std::size_t>(first * align, shape.intermediate));
    rows[n].length = static_cast<int>(std::min<std::size_t>(last * align, shape.intermediate)) - rows[n].begin;
    rows[n].panels = static_cast<int>(round_up(rows[n].length, kPanelWidth) / kPanelWidth);
  }
  return rows;
}

std::size_t planned_weight_bytes(const ExpertShape& shape, int nodes) {
  const std::size_t hidden_panels = round_up(shape.hidden, kPanelWidth) / kPanelWidth;
  std::size_t total = 0;
  for (const IntermediateRows& rows : split_intermediate(shape, nodes)) {
    total += static_cast<std::size_t>(shape.experts) *
             (2 * rows.panels * panel_bytes(shape.format, shape.hidden, shape.group_size) +
              hidden_panels * panel_bytes(shape.format, rows.length, shape.group_size));
  }
  return total;
}

std::size_t MoEEngine::gate_up_panel_bytes(const NodeSlice&) const {
  return panel_bytes(shape_.format, shape_.hidden, shape_.group_size);
}

std::size_t MoEEngine::down_panel_bytes(const NodeSlice& slice) const {
  return panel_bytes(shape_.format, slice.length, shape_.group_size);
}

std::size_t MoEEngine::weight_bytes() const {
  std::size_t total = 0;
  for (const NodeSlice& slice : slices_) total += slice.gate_up.size() + slice.down.size();
  return total;
}

std::vector<MoEEngine::PackedSlice> MoEEngine::packed_slices() const {
  std::vector<PackedSlice> slices;
  for (const NodeSlice& slice : slices_) {
    slices.push_back({slice.begin, slice.length, slice.panels, slice.gate_up, slice.down, gate_up_panel_bytes(slice),
                      down_panel_bytes(slice)});
  }
  return slices;
}

void MoEEngine::pack(const WeightSource& w13, const WeightSource& w2) {
  // Each node's workers copy its slices, so first touch places the pages on that node.
  const int nodes = static_cast<int>(slices_.size());
  std::vector<std::string> errors(runtime_->executor().num_threads());
  Phase phase;
  phase.tasks_per_node.assign(nodes, static_cast<uint32_t>(shape_.experts));
  phase.run = [&](int node, uint32_t expert, int worker) {
    const NodeSlice& slice = slices_[node];
    const SourceMatrix gate_up_source{w13, 2 * static_cast<std::size_t>(shape_.intermediate),
                                      static_cast<std::size_t>(shape_.hidden), expert};
    const SourceMatrix down_source{w2, static_cast<std::size_t>(shape_.hidden),
                                   static_cast<std::size_t>(shape_.intermediate), expert};
    const std::size_t gate_up_bytes = gate_up_panel_bytes(slice), down_bytes = down_panel_bytes(slice);
    int rows[kPanelWidth];
    PackScratch scratch;
    const char* tensor = "w13";
    try {
      for (int half = 0; half < 2; ++half) {
        for (int p = 0; p < slice.panels; ++p) {
          for (int j = 0; j < kPanelWidth; ++j) {
            const int local = p * kPanelWidth + j;
            rows[j] = local < slice.length ? half * shape_.intermediate + slice.begin + local : -1;
          }
          uint8_t* panel = slice.gate_up.as<uint8_t>() + ((expert * 2 + half) * slice.panels + p) * gate_up_bytes;
          pack_panel(gate_up_source, rows, 0, shape_.hidden, shape_.format, shape_.group_size, scratch, panel);
        }
      }
      tensor = "w2";
      for (int q = 0; q < hidden_panels_ && slice.length > 0; ++q) {
        for (int j = 0; j < kPanelWidth; ++j) rows[j] = q * kPanelWidth + j < shape_.hidden ? q * kPanelWidth + j : -1;
        uint8_t* panel = slice.down.as<uint8_t>() + (static_cast<std::size_t>(expert) * hidden_panels_ + q) * down_bytes;
        pack_panel(down_source, rows, slice.begin, slice.length, shape_.format, shape_.group_size, scratch, panel);
      }
    } catch (const std::exception& error) {
      errors[worker] = std::string(tensor) + ": " + error.what();
    }
  };
  std::vector<Phase> job;
  job.push_back(std::move(phase));
  {
    std::lock_guard<std::mutex> lock(runtime_->submit_mutex());
    runtime_->executor().run(std::move(job));
  }
  for (const std::string& error : errors) {
    if (!error.empty()) throw std::invalid_argument(error);
  }
}

void MoEEngine::route(const ForwardArgs& args) {
  Runtime::Scratch& scratch = runtime_->scratch();
  const int experts = shape_.experts;
  const int k = args.topk;
  std::vector<int32_t> counts(experts, 0);
  std::vector<int32_t> ids(static_cast<std::size_t>(args.tokens) * k);
  std::vector<float> weights(ids.size());
  for (int t = 0; t < args.tokens; ++t) {
    for (int j = 0; j < k; ++j) {
      const std::size_t index = static_cast<std::size_t>(t) * k + j;
      const long long id = args.ids_are_int64 ? static_cast<const int64_t*>(args.topk_ids)[index]
                                              : static_cast<const int32_t*>(args.topk_ids)[index];
      if (id < -1 || id >= experts) {
        throw std::out_of_range("topk_ids[" + std::to_string(t) + ", " + std::to_string(j) + "] = " +
                                std::to_string(id) + ": valid ids are -1 (skip) and 0.." +
                                std::to_string(experts - 1));
      }
      ids[index] = static_cast<int32_t>(id);
      weights[index] = load_as_float(args.topk_weights, index, args.weights_dtype);
      if (id < 0) continue;
      // The same expert twice for one token counts once with the summed weight, so an
      // output row never receives two concurrent updates from one kernel call.
      bool merged = false;
      for (int earlier = 0; earlier < j && !merged; ++earlier) {
        const std::size_t other = static_cast<std::size_t>(t) * k + earlier;
        if (ids[other] == id) {
          weights[other] += weights[index];
          ids[index] = -1;
          merged = true;
        }
      }
      if (!merged) ++counts[id];
    }
  }
  scratch.active_experts.clear();
  scratch.expert_slots.assign(1, 0);
  std::vector<int32_t> first_slot(experts, 0);
  for (int e = 0; e < experts; ++e) {
    if (counts[e] == 0) continue;
    first_slot[e] = scratch.expert_slots.back();
    scratch.active_experts.push_back(e);
    scratch.expert_slots.push_back(scratch.expert_slots.back() + counts[e]);
  }
  const std::size_t slots = static_cast<std::size_t>(scratch.expert_slots.back());
  scratch.slot_token.resize(slots);
  scratch.slot_weight.resize(slots);
  // The gated activations are the down projection's input: scaled as the kernels read it.
  const float activation_scale = runtime_->kernels()[shape_.format].activation_scale;
  for (int t = 0; t < args.tokens; ++t) {
    for (int j = 0; j < k; ++j) {
      const std::size_t index = static_cast<std::size_t>(t) * k + j;
      if (ids[index] < 0) continue;
      const int32_t slot = first_slot[ids[index]]++;
      scratch.slot_token[slot] = t;
      scratch.slot_weight[slot] = weights[index] * activation_scale;
    }
  }
}

uint32_t MoEEngine::submit(const ForwardArgs& args) {
  if (args.tokens < 0) throw std::invalid_argument("token count must be >= 0");
  if (args.tokens == 0) return runtime_->executor().launch({});
  if (args.topk < 1) throw std::invalid_argument("top-k must be >= 1");
  if (!args.input || !args.topk_ids || !args.topk_weights || !args.output) {
    throw std::invalid_argument("forward got a null pointer");
  }
  std::lock_guard<std::mutex> lock(runtime_->submit_mutex());
  Executor& executor = runtime_->executor();
  executor.wait_idle();  // the previous job may still use the scratch
  route(args);

  Runtime::Scratch& scratch = runtime_->scratch();
  const int nodes = static_cast<int>(slices_.size());
  const std::size_t tokens = args.tokens, hidden = shape_.hidden;
  const std::size_t slots = scratch.slot_token.size();
  const kernels::FormatKernels& format_kernels = runtime_->kernels()[shape_.format];
  const int chunk_rows = format_kernels.chunk_rows;
  // Where the kernels read activations scaled, the input is copied scaled (the hidden rows
  // are, by their routing weights: route).
  const float activation_scale = format_kernels.activation_scale;
  const bool convert_input = args.input_dtype != DType::F32 || activation_scale != 1.0f;
  if (convert_input) scratch.input.ensure(tokens * hidden * sizeof(float));
  // Integer kernels read activations quantized once per forward.
  const bool integer_rows = format_kernels.integer_rows;
  const QuantizedRows input_q(shape_.format, static_cast<int>(hidden), shape_.group_size);
  std::vector<QuantizedRows> hidden_q;
  // Per node and active expert, the panels of each hidden group computed so far: the task
  // that completes a group quantizes it, so down need not wait for a separate phase.
  std::vector<std::size_t> groups_done_offset(nodes);
  std::size_t groups_done_count = 0;
  if (integer_rows) scratch.input_q.ensure(input_q.bytes(tokens));
  for (int n = 0; n < nodes; ++n) {
    scratch.hidden[n].ensure(std::max<std::size_t>(1, slots * slices_[n].panels * kPanelWidth) * sizeof(float));
    scratch.partial[n].ensure(tokens * hidden_stride_ * sizeof(float));
    hidden_q.emplace_back(shape_.format, slices_[n].length, shape_.group_size);
    if (integer_rows) scratch.hidden_q[n].ensure(std::max<std::size_t>(1, hidden_q[n].bytes(slots)));
    groups_done_offset[n] = groups_done_count;
    if (integer_rows) groups_done_count += static_cast<std::size_t>(scratch.active_experts.size()) * hidden_q[n].groups();
  }
  scratch.group_panels_done.assign(groups_done_count, 0);
  // Where tile kernels take an expert's rows, gate and up pack them per task (in the worker's
  // buffer), and down's are packed once per chunk of an expert's rows, in a phase of their
  // own: every down task walks every expert (packed per task, a bf16 layer of 1024 tokens
  // packed each expert's rows 16 times).
  bool tiles_in_use = false;
  std::vector<uint32_t> first_chunk(scratch.active_experts.size() + 1, 0);  // of each active expert
  for (std::size_t e = 0; e < scratch.active_experts.size(); ++e) {
    const int rows = scratch.expert_slots[e + 1] - scratch.expert_slots[e];
    tiles_in_use = tiles_in_use || kernels::tiles_take(format_kernels, std::min(rows, chunk_rows));
    first_chunk[e + 1] = first_chunk[e] + static_cast<uint32_t>((rows + chunk_rows - 1) / chunk_rows);
  }
  const uint32_t chunks = first_chunk.back();
  std::vector<std::size_t> down_chunk_bytes(nodes, 0);
  for (int n = 0; n < nodes && tiles_in_use; ++n) {
    down_chunk_bytes[n] = round_up(kernels::packed_bytes(format_kernels, chunk_rows, slices_[n].length), 64);
    scratch.packed_hidden[n].ensure(std::max<std::size_t>(1, chunks * down_chunk_bytes[n]));
  }
  const std::size_t packed_floats =
      format_kernels.pack_rows ? round_up(kernels::packed_bytes(format_kernels, chunk_rows, static_cast<int>(hidden)), 64) /
                                     sizeof(float)
                               : 0;
  const std::size_t widened_floats = kernels::kPanelWorkspaceBytes / sizeof(float);
  const std::size_t worker_floats = round_up(2 * chunk_rows * kPanelWidth + widened_floats + packed_floats, 16);
  scratch.per_worker.ensure(worker_floats * executor.num_threads() * sizeof(float));

  const float* input_rows = convert_input ? scratch.input.as<float>() : static_cast<const float*>(args.input);
  const uint32_t token_blocks = static_cast<uint32_t>((tokens + kTokenBlock - 1) / kTokenBlock);
  const uint32_t active = static_cast<uint32_t>(scratch.active_experts.size());
  std::vector<Phase> job;

  if (convert_input || integer_rows) {
    Phase phase{spread(token_blocks, nodes), {}};
    phase.run = [=, &scratch](int node, uint32_t task, int) {
      const std::size_t block = spread_offset(token_blocks, nodes, node) + task;
      const std::size_t first = block * kTokenBlock, last = std::min(tokens, (block + 1) * kTokenBlock);
      if (convert_input) {
        float* out = scratch.input.as<float>();
        for (std::size_t i = first * hidden; i < last * hidden; ++i) {
          out[i] = load_as_float(args.input, i, args.input_dtype) * activation_scale;
        }
      }
      if (integer_rows) {
        for (std::size_t t = first; t < last; ++t) input_q.quantize(input_rows + t * hidden, scratch.input_q.data(), t);
      }
    };
    job.push_back(std::move(phase));
  }

  const int node_threads = (executor.num_threads() + nodes - 1) / nodes;
  const auto gate_up_run = [=](int panels) {
    return run_length(static_cast<std::size_t>(active) * panels, panels, node_threads, tiles_in_use ? panels : kRunPanels);
  };
  Phase gate_up{std::vector<uint32_t>(nodes), {}};
  for (int n = 0; n < nodes; ++n) {
    const int panels = slices_[n].panels, run = gate_up_run(panels);
    gate_up.tasks_per_node[n] = active * ((panels + run - 1) / run);
  }
  gate_up.run = [=, this, &scratch](int node, uint32_t task, int worker) {
    const NodeSlice& slice = slices_[node];
    const kernels::KernelSet& kernels = runtime_->kernels();
    const int run = gate_up_run(slice.panels), runs = (slice.panels + run - 1) / run;
    const uint32_t expert_index = task / runs;
    const int first_panel = static_cast<int>(task % runs) * run, end_panel = std::min(slice.panels, first_panel + run);
    const int expert = scratch.active_experts[expert_index];
    const int first = scratch.expert_slots[expert_index], last = scratch.expert_slots[expert_index + 1];
    const std::size_t panel_bytes = gate_up_panel_bytes(slice);
    const char* gates = slice.gate_up.as<char>() + static_cast<std::size_t>(expert) * 2 * slice.panels * panel_bytes;
    const char* ups = gates + static_cast<std::size_t>(slice.panels) * panel_bytes;
    float* workspace = scratch.per_worker.as<float>() + worker * worker_floats;
    float* gate_tile = workspace;
    float* up_tile = gate_tile + chunk_rows * kPanelWidth;
    const int group = shape_.group_size;
    float* widened = up_tile + chunk_rows * kPanelWidth;
    float* packing = widened + widened_floats;
    const kernels::ActivationRows activate = kernels.activation.rows[static_cast<int>(shape_.activation)];
    const kernels::ActivationParams params{shape_.swiglu_alpha, shape_.swiglu_limit};
    const std::size_t hidden_row = static_cast<std::size_t>(slice.panels) * kPanelWidth;
    float* hidden_out = scratch.hidden[node].as<float>();
    kernels::ActivationRow rows[kMaxChunkRows];
    float* gate_rows[kMaxChunkRows];
    float* up_rows[kMaxChunkRows];
    // Chunk by chunk, so that rows packed for the tile kernels serve every panel of the run.
    for (int chunk = first; chunk < last; chunk += chunk_rows) {
      const int count = std::min(chunk_rows, last - chunk);
      for (int i = 0; i < count; ++i) {
        const std::size_t token = scratch.slot_token[chunk + i];
        rows[i] = integer_rows ? input_q.row(input_rows + token * hidden, scratch.input_q.data(), token)
                               : kernels::ActivationRow{input_rows + token * hidden, nullptr, nullptr, nullptr, nullptr, nullptr};
        gate_rows[i] = gate_tile + i * kPanelWidth;
        up_rows[i] = up_tile + i * kPanelWidth;
      }
      const void* packed =
          kernels::pack_for_tiles(kernels[shape_.format], rows, count, static_cast<int>(hidden), packing);
      for (int panel_index = first_panel; panel_index < end_panel; ++panel_index) {
        const char* gate = gates + panel_index * panel_bytes;
        const char* up = ups + panel_index * panel_bytes;
        const int valid = std::min(kPanelWidth, slice.length - panel_index * kPanelWidth);
        kernels::multiply_two_panels(kernels, shape_.format, gate, up, static_cast<int>(hidden), group, rows, count,
                                     gate_rows, up_rows, false, widened, packed);
        activate(gate_tile, up_tile, count, valid, scratch.slot_weight.data() + chunk, params,
                 hidden_out + chunk * hidden_row + panel_index * kPanelWidth, hidden_row);
      }
    }
    if (!integer_rows) return;
    const int group_panels = group / kPanelWidth;
    uint32_t* groups_done = scratch.group_panels_done.data() + groups_done_offset[node] +
                            static_cast<std::size_t>(expert_index) * hidden_q[node].groups();
    for (int g = first_panel / group_panels; g * group_panels < end_panel; ++g) {
      const int group_begin = g * group_panels, group_end = std::min(slice.panels, group_begin + group_panels);
      const uint32_t mine = std::min(end_panel, group_end) - std::max(first_panel, group_begin);
      // acq_rel: the task that completes the group sees every other task's hidden values.
      const uint32_t before = std::atomic_ref<uint32_t>(groups_done[g]).fetch_add(mine, std::memory_order_acq_rel);
      if (before + mine != static_cast<uint32_t>(group_end - group_begin)) continue;
      for (int slot = first; slot < last; ++slot) {
        hidden_q[node].quantize_group(hidden_out + slot * hidden_row, scratch.hidden_q[node].data(), slot, g);
      }
    }
  };
  job.push_back(std::move(gate_up));

  // The rows of each chunk of an expert's hidden rows that tile kernels take, packed once.
  const auto down_rows = [=, this, &scratch](int node, std::size_t slot) {
    const std::size_t hidden_row = static_cast<std::size_t>(slices_[node].panels) * kPanelWidth;
    const float* values = scratch.hidden[node].as<float>() + slot * hidden_row;
    return integer_rows ? hidden_q[node].row(values, scratch.hidden_q[node].data(), slot)
                        : kernels::ActivationRow{values, nullptr, nullptr, nullptr, nullptr, nullptr};
  };
  if (tiles_in_use) {
    Phase pack_down{std::vector<uint32_t>(nodes, chunks), {}};
    pack_down.run = [=, this, &scratch](int node, uint32_t chunk, int) {
      if (slices_[node].length == 0) return;
      const auto expert_index = static_cast<std::size_t>(
          std::upper_bound(first_chunk.begin(), first_chunk.end(), chunk) - first_chunk.begin() - 1);
      const int first = scratch.expert_slots[expert_index] + static_cast<int>(chunk - first_chunk[expert_index]) * chunk_rows;
      const int count = std::min(chunk_rows, scratch.expert_slots[expert_index + 1] - first);
      if (!kernels::tiles_take(format_kernels, count)) return;
      kernels::ActivationRow rows[kMaxChunkRows];
      for (int i = 0; i < count; ++i) rows[i] = down_rows(node, first + i);
      kernels::pack_for_tiles(format_kernels, rows, count, slices_[node].length,
                              scratch.packed_hidden[node].as<uint8_t>() + chunk * down_chunk_bytes[node]);
    };
    job.push_back(std::move(pack_down));
  }

  // A task owns a run of output panels, so it may walk them expert by expert.
  const int down_run = run_length(hidden_panels_, hidden_panels_, node_threads);
  Phase down{std::vector<uint32_t>(nodes, static_cast<uint32_t>((hidden_panels_ + down_run - 1) / down_run)), {}};
  down.run = [=, this, &scratch](int node, uint32_t task, int worker) {
    const NodeSlice& slice = slices_[node];
    const int first_panel = static_cast<int>(task) * down_run, end_panel = std::min(hidden_panels_, first_panel + down_run);
    float* partial = scratch.partial[node].as<float>();
    for (std::size_t t = 0; t < tokens; ++t) {
      std::fill(partial + t * hidden_stride_ + first_panel * kPanelWidth, partial + t * hidden_stride_ + end_panel * kPanelWidth,
                0.0f);
    }
    if (slice.length == 0) return;
    const kernels::KernelSet& kernels = runtime_->kernels();
    const std::size_t panel_bytes = down_panel_bytes(slice);
    const int group = shape_.group_size;
    float* widened = scratch.per_worker.as<float>() + worker * worker_floats + 2 * chunk_rows * kPanelWidth;
    // Where the ISA reads two panels side by side, panel p goes with p + half of the run:
    // each of the two streams then walks consecutive panels, so its prefetch runs on into
    // the panel it reads next. (Neighbours paired, the first panel's stream ran into the
    // second's, and INT4 decode was 2-6% slower than single panels.)
    const int run = end_panel - first_panel;
    const int half = kernels[shape_.format].gemm_pair != nullptr ? run / 2 : 0;
    kernels::ActivationRow rows[kMaxChunkRows];
    float* out_rows[kMaxChunkRows];
    float* partner_out_rows[kMaxChunkRows];
    for (uint32_t expert_index = 0; expert_index < active; ++expert_index) {
      const int expert = scratch.active_experts[expert_index];
      const int first = scratch.expert_slots[expert_index], last = scratch.expert_slots[expert_index + 1];
      for (int chunk = first; chunk < last; chunk += chunk_rows) {
        const int count = std::min(chunk_rows, last - chunk);
        for (int i = 0; i < count; ++i) rows[i] = down_rows(node, chunk + i);
        const uint32_t packed_chunk = first_chunk[expert_index] + static_cast<uint32_t>((chunk - first) / chunk_rows);
        const void* packed =
            kernels::tiles_take(format_kernels, count)
                ? scratch.packed_hidden[node].as<uint8_t>() + packed_chunk * down_chunk_bytes[node]
                : nullptr;
        for (int step = 0; step < run - half; ++step) {
          const bool paired = step < half;
          const int panel_index = first_panel + (paired ? step : half + step);
          const char* panel = slice.down.as<char>() +
                              (static_cast<std::size_t>(expert) * hidden_panels_ + panel_index) * panel_bytes;
          for (int i = 0; i < count; ++i) {
            out_rows[i] = partial + static_cast<std::size_t>(scratch.slot_token[chunk + i]) * hidden_stride_ +
                          panel_index * kPanelWidth;
            partner_out_rows[i] = out_rows[i] + half * kPanelWidth;
          }
          if (paired) {
            kernels::multiply_two_panels(kernels, shape_.format, panel, panel + half * panel_bytes, slice.length, group,
                                         rows, count, out_rows, partner_out_rows, true, widened, packed);
          } else {
            kernels::multiply_panel(kernels, shape_.format, panel, slice.length, group, rows, count, out_rows, true,
                                    widened, packed);
          }
        }
      }
    }
  };
  job.push_back(std::move(down));

  Phase combine{spread(token_blocks, nodes), {}};
  combine.run = [=, this, &scratch](int node, uint32_t task, int) {
    const std::size_t block = spread_offset(token_blocks, nodes, node) + task;
    const std::size_t end = std::min(tokens, (block + 1) * kTokenBlock);
    for (std::size_t t = block * kTokenBlock; t < end; ++t) {
      for (std::size_t h = 0; h < hidden; ++h) {
        float sum = 0.0f;
        for (int n = 0; n < nodes; ++n) sum += scratch.partial[n].as<float>()[t * hidden_stride_ + h];
        store_from_float(args.output, t * hidden + h, args.output_dtype, sum);
      }
    }
  };
  job.push_back(std::move(combine));
  return executor.launch(std::move(job));
}

}  // namespace lk
