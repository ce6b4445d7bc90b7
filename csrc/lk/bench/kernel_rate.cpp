#include "kernel_rate.h"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <vector>

#include "lk/cpu_features.h"
#include "lk/formats.h"
#include "lk/kernels/kernels.h"

namespace lk::bench {
namespace {

constexpr int kGroup = 128;

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
// over their whole range, every scale (and INT4 offset) 1/64. The value bytes are a whole
// number of 64-byte lines (formats.h), so they fill two bytes at a time.
std::vector<uint8_t> random_panel(WeightFormat format, int depth, std::mt19937& rng) {
  std::vector<uint8_t> panel(panel_bytes(format, depth, kGroup));
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
  for (std::size_t i = values; i + 4 <= panel.size(); i += 4) {
    const float scale = 1.0f / 64;
    std::memcpy(&panel[i], &scale, 4);
  }
  return panel;
}

}  // namespace

double kernel_ns_per_panel_row(const std::string& isa, const std::string& format_text, int rows, int depth, bool pair,
                               double seconds) {
  const WeightFormat format = parse_format(format_text);
  const kernels::KernelSet& kernel_set = kernels_for(isa);
  const kernels::FormatKernels& kernel = kernel_set[format];
  if (rows < 1 || rows > kernels::kMaxPanelRows) {
    throw std::invalid_argument("rows must be 1.." + std::to_string(kernels::kMaxPanelRows));
  }
  if (depth < 1) throw std::invalid_argument("depth must be positive");
  if (pair && rows > kernel.pair_rows) {
    throw std::invalid_argument(format_text + " on " + isa + " reads two panels for at most " +
                                std::to_string(kernel.pair_rows) + " rows");
  }
  std::mt19937 rng(12345);
  const std::vector<uint8_t> first = random_panel(format, depth, rng);
  const std::vector<uint8_t> second = random_panel(format, depth, rng);

  // Activation rows: fp32 values and their integer form per group (and, for 8-bit formats,
  // as bytes in quad order with their sums per span), zero past `depth` up to a multiple of
  // 4 as the engine prepares them.
  const int padded = (depth + 3) / 4 * 4;
  const int groups = (depth + kGroup - 1) / kGroup;
  const int spans = groups * kernels::spans_per_group(kGroup);
  const int largest = kernels::activation_max(format);
  std::vector<float> values(static_cast<std::size_t>(rows) * padded, 0.0f);
  std::vector<int16_t> quantized(static_cast<std::size_t>(rows) * padded, 0);
  std::vector<int8_t> quads(static_cast<std::size_t>(rows) * padded, 0);
  std::vector<float> group_scales(static_cast<std::size_t>(rows) * groups, 1.0f / static_cast<float>(largest));
  std::vector<float> group_sums(static_cast<std::size_t>(rows) * groups, 0.0f);
  std::vector<int32_t> span_sums(static_cast<std::size_t>(rows) * spans, 0);
  std::uniform_real_distribution<float> activation(-1.0f, 1.0f);
  std::vector<kernels::ActivationRow> a(rows);
  std::vector<float> out(static_cast<std::size_t>(rows) * 2 * kPanelWidth);
  std::vector<float*> c_first(rows), c_second(rows);
  std::vector<uint8_t> widened(kernels::kWidenedPanelBytes);
  for (int r = 0; r < rows; ++r) {
    const std::size_t row = static_cast<std::size_t>(r) * padded;
    for (int k = 0; k < depth; ++k) {
      const float v = activation(rng);
      values[row + k] = v;
      quantized[row + k] = static_cast<int16_t>(v * static_cast<float>(largest));
      quads[row + (k & ~3) + kInt4QuadOrder[k & 3]] = static_cast<int8_t>(quantized[row + k]);
    }
    a[r] = {&values[row], &quantized[row], &group_scales[static_cast<std::size_t>(r) * groups],
            &group_sums[static_cast<std::size_t>(r) * groups], &quads[row], &span_sums[static_cast<std::size_t>(r) * spans]};
    c_first[r] = &out[static_cast<std::size_t>(r) * 2 * kPanelWidth];
    c_second[r] = c_first[r] + kPanelWidth;
  }

  auto call = [&] {
    if (pair) {
      kernel.gemm_pair(a.data(), rows, first.data(), second.data(), depth, kGroup, c_first.data(), c_second.data(),
                       false);
    } else {
      kernels::multiply_panel(kernel_set, format, first.data(), depth, kGroup, a.data(), rows, c_first.data(), false,
                              widened.data());
    }
  };
  using Clock = std::chrono::steady_clock;
  // Calls per timing: as many as fill seconds / kTimings, from one call timed after a
  // warm-up. Many short timings, of which the best counts: a preempted one is discarded.
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
  const double panel_rows = static_cast<double>(calls) * depth * (pair ? 2 : 1);
  return best / panel_rows * 1e9;
}

std::size_t kernel_panel_bytes(const std::string& format, int depth) {
  if (depth < 1) throw std::invalid_argument("depth must be positive");
  return panel_bytes(parse_format(format), depth, kGroup);
}

int kernel_pair_rows(const std::string& isa, const std::string& format_text) {
  return kernels_for(isa)[parse_format(format_text)].pair_rows;
}

}  // namespace lk::bench
