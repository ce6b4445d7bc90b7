#include "lk/moe_engine.h"

#include <algorithm>
#include <numeric>
#include <stdexcept>
#include <string>
#include <utility>

#include "lk/job_planning.h"

namespace lk {

MoEEngine::MoEEngine(std::shared_ptr<Runtime> runtime, const WeightSource& w13, const WeightSource& w2,
                     const ExpertShape& shape, const ExpertBiases& biases)
    : runtime_(std::move(runtime)), shape_(shape) {
  if (!runtime_) throw std::invalid_argument("runtime is null");
  if (shape.experts < 1 || shape.hidden < 1 || shape.intermediate < 1) {
    throw std::invalid_argument("experts, hidden and intermediate sizes must be >= 1, got E=" +
                                std::to_string(shape.experts) + " H=" + std::to_string(shape.hidden) +
                                " I=" + std::to_string(shape.intermediate));
  }
  if (static_cast<unsigned>(shape.activation) >= static_cast<unsigned>(kNumActivations)) {
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
    slice.gate_up = HostBuffer(static_cast<std::size_t>(shape.experts) * 2 * slice.panels * gate_up_panel_bytes());
    slice.down = HostBuffer(static_cast<std::size_t>(shape.experts) * hidden_panels_ * down_panel_bytes(slice));
  }
  if (runtime_->kernels()[shape.format].integer_rows) {
    input_q_ = QuantizedRows(shape.format, shape.hidden, shape.group_size);
    for (const NodeSlice& slice : slices_) hidden_q_.emplace_back(shape.format, slice.length, shape.group_size);
  }
  pack(w13, w2);
  const std::size_t experts = shape.experts;
  if (biases.gate_up) gate_up_bias_.assign(biases.gate_up, biases.gate_up + experts * 2 * shape.intermediate);
  if (biases.down) down_bias_.assign(biases.down, biases.down + experts * shape.hidden);
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

std::size_t MoEEngine::gate_up_panel_bytes() const {
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
    slices.push_back({.begin = slice.begin,
                      .length = slice.length,
                      .panels = slice.panels,
                      .gate_up = slice.gate_up,
                      .down = slice.down,
                      .gate_up_panel_bytes = gate_up_panel_bytes(),
                      .down_panel_bytes = down_panel_bytes(slice)});
  }
  return slices;
}

void MoEEngine::pack(const WeightSource& w13, const WeightSource& w2) {
  const std::vector<uint32_t> tasks(slices_.size(), static_cast<uint32_t>(shape_.experts));
  pack_on_workers(*runtime_, tasks, [&](int node, uint32_t expert) {
    const NodeSlice& slice = slices_[node];
    const SourceMatrix gate_up_source{.source = w13,
                                      .rows = 2 * static_cast<std::size_t>(shape_.intermediate),
                                      .cols = static_cast<std::size_t>(shape_.hidden),
                                      .expert = expert};
    const SourceMatrix down_source{.source = w2,
                                   .rows = static_cast<std::size_t>(shape_.hidden),
                                   .cols = static_cast<std::size_t>(shape_.intermediate),
                                   .expert = expert};
    const std::size_t gate_up_bytes = gate_up_panel_bytes(), down_bytes = down_panel_bytes(slice);
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
      throw std::invalid_argument(std::string(tensor) + ": " + error.what());
    }
  });
}

}  // namespace lk
