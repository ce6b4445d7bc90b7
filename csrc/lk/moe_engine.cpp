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

#include "lk/activation_rows.h"
#include "lk/job_planning.h"

namespace lk {

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
  const std::vector<uint32_t> tasks(slices_.size(), static_cast<uint32_t>(shape_.experts));
  pack_on_workers(*runtime_, tasks, [&](int node, uint32_t expert) {
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
      throw std::invalid_argument(std::string(tensor) + ": " + error.what());
    }
  });
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
