#include "kernel_rate.h"

#include <algorithm>
#include <bit>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <vector>

#include "lk/activation_rows.h"
#include "lk/cpu_features.h"
#include "lk/formats.h"
#include "lk/host_buffer.h"
#include "lk/kernels/kernels.h"

namespace lk::bench {
namespace {

constexpr int kGroup = 128;
// The group a format's panel is multiplied in: kGroup, the e2m1 formats' own.
int group_of(WeightFormat format) { return is_e2m1(format) ? e2m1_group(format) : kGroup; }

WeightFormat parse_format(const std::string& format_text) {
  for (int code = 0; code < kNumWeightFormats; ++code) {
    if (format_text == format_name(static_cast<WeightFormat>(code))) return static_cast<WeightFormat>(code);
  }
  throw std::invalid_argument("unknown weight format '" + format_text + "'");
}

const kernels::KernelSet& kernels_for(const std::string& isa_text) {
  const Isa isa = parse_isa(isa_text);
  if (static_cast<int>(isa) > static_cast<int>(detect_best_isa())) {
    throw std::invalid_argument("this CPU cannot run " + isa_text + " kernels (best: " +
                                lk::isa_name(detect_best_isa()) + ")");
  }
  return kernels::kernel_set(isa);
}

// A panel of plausible values: normal floats near 1 (no NaN, no denormal weights), integers
// over their whole range, every scale (and INT4 offset) 1/64 (MXFP4's e8m0 2^-6, NVFP4's
// scale codes of 1/64 with row scales 1/64 too). The value bytes are a whole
// number of 64-byte lines (formats.h), so they fill two bytes at a time. Page-aligned, as
// the engine's panels and buffers are (tile loads across lines are slow).
HostBuffer random_panel(WeightFormat format, int depth, std::mt19937& rng) {
  HostBuffer buffer(panel_bytes(format, depth, group_of(format)));
  uint8_t* panel = buffer.as<uint8_t>();
  const std::size_t values = panel_value_bytes(format, depth);
  for (std::size_t i = 0; i < values; i += 2) {
    const uint32_t r = rng();
    uint16_t word = static_cast<uint16_t>(r);
    if (format == WeightFormat::BF16) word = static_cast<uint16_t>(0x3f00u | (r & 0x807fu));
    if (format == WeightFormat::F16) word = static_cast<uint16_t>(0x3800u | (r & 0x87ffu));
    if (format == WeightFormat::Fp8E4M3) word = static_cast<uint16_t>(0x3838u | (r & 0x8787u));
    std::memcpy(&panel[i], &word, 2);
  }
  if (format == WeightFormat::F32) {
    std::uniform_real_distribution<float> value(-1.0f, 1.0f);
    for (std::size_t i = 0; i + 4 <= values; i += 4) {
      const float v = value(rng);
      std::memcpy(&panel[i], &v, 4);
    }
  }
  for (std::size_t i = values; i + 4 <= buffer.size(); i += 4) {
    const float scale = 1.0f / 64;
    std::memcpy(&panel[i], &scale, 4);
    if (format == WeightFormat::Mxfp4) std::memset(&panel[i], 127 - 6, 4);
  }
  if (format == WeightFormat::Nvfp4) {  // as the engine packs them: scale codes, row scales times their unit
    const std::size_t group_rows = panel_groups(depth, kNvfp4Group) * kPanelWidth;
    std::memset(&panel[values], nvfp4_scale_code(1.0f / 64), group_rows);
    const float row_scale = kNvfp4ScaleCodeUnit / 64;
    for (int j = 0; j < kPanelWidth; ++j) std::memcpy(&panel[row_scale_line(values, group_rows) + 4 * j], &row_scale, 4);
  }
  return buffer;
}

// Whether the engine multiplies an expert's gate and up panels side by side for `rows`
// rows: by the unit kernels (kernels::multiply_two_panels), or the pair kernel.
bool reads_two_panels(const kernels::FormatKernels& kernel, int rows) {
  return kernels::unit_takes(kernel, rows) || rows <= kernel.pair_rows;
}

// Activation rows: fp32 values (scaled as the kernels read them), zero past `depth` up to a
// multiple of 4, and for the integer kernels their records as the engine quantizes them.
struct RandomRows {
  std::vector<float> values;
  QuantizedRows quantized;
  std::vector<std::byte> records;
  std::vector<kernels::ActivationRow> rows;
};

RandomRows random_rows(const kernels::FormatKernels& kernel, WeightFormat format, int rows, int depth,
                       bool bf16_inputs, std::mt19937& rng) {
  const int padded = (depth + 3) / 4 * 4;
  RandomRows a;
  a.values.assign(static_cast<std::size_t>(rows) * padded, 0.0f);
  if (kernel.integer_rows) {
    a.quantized = QuantizedRows(format, depth, group_of(format));
    a.records.resize(a.quantized.bytes(rows));
  }
  a.rows.resize(rows);
  std::uniform_real_distribution<float> activation(-1.0f, 1.0f);
  for (int r = 0; r < rows; ++r) {
    float* row = &a.values[static_cast<std::size_t>(r) * padded];
    for (int k = 0; k < depth; ++k) {
      float v = activation(rng);
      if (bf16_inputs) v = std::bit_cast<float>(std::bit_cast<uint32_t>(v) & 0xffff0000u);
      row[k] = v * kernel.activation_scale;
    }
    if (!kernel.integer_rows) {
      a.rows[r] = kernels::ActivationRow::of_values(row);
      continue;
    }
    a.quantized.quantize(row, a.records.data(), r);
    a.rows[r] = a.quantized.row(row, a.records.data(), r);
  }
  return a;
}

// Seconds per call of `call`, the best of many short timings (a preempted one is
// discarded), each as many calls as fill seconds / kTimings, from one call timed after a
// warm-up.
template <typename Call>
double best_seconds_per_call(const Call& call, double seconds) {
  using Clock = std::chrono::steady_clock;
  call();
  const auto start = Clock::now();
  call();
  const double once = std::max(std::chrono::duration<double>(Clock::now() - start).count(), 1e-7);
  constexpr int kTimings = 15;
  const long calls = std::max(1L, static_cast<long>(seconds / kTimings / once));
  double best = std::numeric_limits<double>::infinity();
  for (int timing = 0; timing < kTimings; ++timing) {
    const auto t0 = Clock::now();
    for (long i = 0; i < calls; ++i) call();
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return best / static_cast<double>(calls);
}

}  // namespace

double kernel_ns_per_panel_row(const std::string& isa, const std::string& format_text, int rows, int depth, bool pair,
                               double seconds, bool bf16_inputs) {
  const WeightFormat format = parse_format(format_text);
  const kernels::KernelSet& kernel_set = kernels_for(isa);
  const kernels::FormatKernels& kernel = kernel_set[format];
  if (rows < 1 || rows > kernel.chunk_rows) {
    throw std::invalid_argument("rows must be 1.." + std::to_string(kernel.chunk_rows) + " for " + format_text + " on " +
                                isa + " (the engine's chunk)");
  }
  if (depth < 1) throw std::invalid_argument("depth must be positive");
  if (is_e2m1(format) && depth % e2m1_group(format) != 0) {
    throw std::invalid_argument(format_text + " depth must be a multiple of " + std::to_string(e2m1_group(format)) +
                                " (its panels hold whole groups)");
  }
  if (pair && !reads_two_panels(kernel, rows)) {
    throw std::invalid_argument(format_text + " on " + isa + " does not read two panels side by side for " +
                                std::to_string(rows) + " rows");
  }
  std::mt19937 rng(12345);
  const HostBuffer first = random_panel(format, depth, rng);
  const HostBuffer second = random_panel(format, depth, rng);
  const RandomRows a = random_rows(kernel, format, rows, depth, bf16_inputs, rng);
  std::vector<float> out(static_cast<std::size_t>(rows) * 2 * kPanelWidth);
  std::vector<float*> c_first(rows), c_second(rows);
  for (int r = 0; r < rows; ++r) {
    c_first[r] = &out[static_cast<std::size_t>(r) * 2 * kPanelWidth];
    c_second[r] = c_first[r] + kPanelWidth;
  }
  HostBuffer widened(kernels::kPanelWorkspaceBytes);
  // Where unit kernels take this many rows, the rows are staged once, as the engine stages
  // a chunk once for all the panels of a task: the staging is not timed.
  HostBuffer staging(kernel.stage_rows != nullptr ? kernels::staged_bytes(kernel, rows, depth) : 0);
  const void* staged = kernels::stage_for_unit(kernel, a.rows.data(), rows, depth, staging.data());
  const auto call = [&] {
    if (pair) {
      kernels::multiply_two_panels(kernel_set, format, first.data(), second.data(), depth, group_of(format), a.rows.data(), rows,
                                   c_first.data(), c_second.data(), false, widened.data(), staged);
    } else {
      kernels::multiply_panel(kernel_set, format, first.data(), depth, group_of(format), a.rows.data(), rows, c_first.data(),
                              false, widened.data(), staged);
    }
  };
  return best_seconds_per_call(call, seconds) / (static_cast<double>(depth) * (pair ? 2 : 1)) * 1e9;
}

std::size_t kernel_panel_bytes(const std::string& format, int depth) {
  if (depth < 1) throw std::invalid_argument("depth must be positive");
  const WeightFormat parsed = parse_format(format);
  return panel_bytes(parsed, depth, group_of(parsed));
}

int kernel_chunk_rows(const std::string& isa, const std::string& format_text) {
  return kernels_for(isa)[parse_format(format_text)].chunk_rows;
}

bool kernel_reads_two_panels(const std::string& isa, const std::string& format_text, int rows) {
  return reads_two_panels(kernels_for(isa)[parse_format(format_text)], rows);
}

}  // namespace lk::bench
