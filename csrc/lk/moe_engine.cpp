#include "lk/moe_engine.h"

#include <algorithm>
#include <mutex>
#include <stdexcept>
#include <string>

namespace lk {
namespace {

// Rows handed to one kernel call; bounds the per-worker tile buffers.
constexpr int kChunkRows = 64;
// From this many tokens on one expert (prefill), each weight panel is widened to fp32 once
// and reused by all of them; below it (decode) the kernel converts while streaming.
constexpr int kWidenMinRows = 8;
// Tokens per task when converting the input and combining the nodes' outputs.
constexpr int kTokenBlock = 16;

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

template <class Element>
void pack_gate_up(const Element* w13, Element* out, int begin, int length, int panels, int hidden,
                  int intermediate) {
  for (int half = 0; half < 2; ++half) {
    for (int p = 0; p < panels; ++p) {
      Element* panel = out + (static_cast<std::size_t>(half) * panels + p) * hidden * kPanelWidth;
      for (int j = 0; j < kPanelWidth; ++j) {
        const int local_row = p * kPanelWidth + j;
        if (local_row >= length) {
          for (int k = 0; k < hidden; ++k) panel[static_cast<std::size_t>(k) * kPanelWidth + j] = Element{};
          continue;
        }
        const Element* source =
            w13 + (static_cast<std::size_t>(half) * intermediate + begin + local_row) * hidden;
        for (int k = 0; k < hidden; ++k) panel[static_cast<std::size_t>(k) * kPanelWidth + j] = source[k];
      }
    }
  }
}

template <class Element>
void pack_down(const Element* w2, Element* out, int begin, int length, int hidden_panels, int hidden,
               int intermediate) {
  for (int q = 0; q < hidden_panels; ++q) {
    Element* panel = out + static_cast<std::size_t>(q) * length * kPanelWidth;
    for (int j = 0; j < kPanelWidth; ++j) {
      const int h = q * kPanelWidth + j;
      const Element* source = w2 + static_cast<std::size_t>(h) * intermediate + begin;
      for (int k = 0; k < length; ++k) {
        panel[static_cast<std::size_t>(k) * kPanelWidth + j] = h < hidden ? source[k] : Element{};
      }
    }
  }
}

}  // namespace

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "float32";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
  }
  return "?";
}

MoEEngine::MoEEngine(std::shared_ptr<Runtime> runtime, const void* w13, const void* w2,
                     const ExpertShape& shape)
    : runtime_(std::move(runtime)), shape_(shape) {
  if (!runtime_) throw std::invalid_argument("runtime is null");
  if (shape.experts < 1 || shape.hidden < 1 || shape.intermediate < 1) {
    throw std::invalid_argument("experts, hidden and intermediate sizes must be >= 1, got E=" +
                                std::to_string(shape.experts) + " H=" + std::to_string(shape.hidden) +
                                " I=" + std::to_string(shape.intermediate));
  }
  if (!w13 || !w2) throw std::invalid_argument("weight pointers are null");
  if (static_cast<unsigned>(shape.activation) > static_cast<unsigned>(Activation::SwigluOai)) {
    throw std::invalid_argument("unknown activation");
  }
  hidden_panels_ = static_cast<int>(round_up(shape.hidden, kPanelWidth) / kPanelWidth);
  hidden_stride_ = hidden_panels_ * kPanelWidth;

  // Whole panels per node, so no panel straddles two nodes' memory.
  const int nodes = runtime_->topology().num_nodes();
  const int total_panels = static_cast<int>(round_up(shape.intermediate, kPanelWidth) / kPanelWidth);
  slices_.resize(nodes);
  for (int n = 0; n < nodes; ++n) {
    const int first_panel = static_cast<int>(total_panels * 1ll * n / nodes);
    const int last_panel = static_cast<int>(total_panels * (n + 1ll) / nodes);
    NodeSlice& slice = slices_[n];
    slice.begin = std::min(first_panel * kPanelWidth, shape.intermediate);
    slice.length = std::min(last_panel * kPanelWidth, shape.intermediate) - slice.begin;
    slice.panels = last_panel - first_panel;
    const std::size_t element = dtype_size(shape.weight_dtype);
    slice.gate_up = HostBuffer(static_cast<std::size_t>(shape.experts) * 2 * slice.panels *
                               shape.hidden * kPanelWidth * element);
    slice.down = HostBuffer(static_cast<std::size_t>(shape.experts) * hidden_panels_ * slice.length *
                            kPanelWidth * element);
  }
  pack(w13, w2);
}

std::size_t MoEEngine::weight_bytes() const {
  std::size_t total = 0;
  for (const NodeSlice& slice : slices_) total += slice.gate_up.size() + slice.down.size();
  return total;
}

void MoEEngine::pack(const void* w13, const void* w2) {
  // Each node's workers copy its slices, so first touch places the pages on that node.
  const int nodes = static_cast<int>(slices_.size());
  Phase phase;
  phase.tasks_per_node.assign(nodes, static_cast<uint32_t>(shape_.experts));
  phase.run = [&](int node, uint32_t expert, int) {
    const NodeSlice& slice = slices_[node];
    const std::size_t w13_expert = static_cast<std::size_t>(2) * shape_.intermediate * shape_.hidden;
    const std::size_t w2_expert = static_cast<std::size_t>(shape_.hidden) * shape_.intermediate;
    const std::size_t gate_up_expert = static_cast<std::size_t>(2) * slice.panels * shape_.hidden * kPanelWidth;
    const std::size_t down_expert = static_cast<std::size_t>(hidden_panels_) * slice.length * kPanelWidth;
    auto copy = [&](auto element) {
      using Element = decltype(element);
      pack_gate_up(static_cast<const Element*>(w13) + expert * w13_expert,
                   slice.gate_up.as<Element>() + expert * gate_up_expert, slice.begin, slice.length,
                   slice.panels, shape_.hidden, shape_.intermediate);
      pack_down(static_cast<const Element*>(w2) + expert * w2_expert,
                slice.down.as<Element>() + expert * down_expert, slice.begin, slice.length,
                hidden_panels_, shape_.hidden, shape_.intermediate);
    };
    if (shape_.weight_dtype == DType::F32) {
      copy(float{});
    } else {
      copy(uint16_t{});
    }
  };
  std::vector<Phase> job;
  job.push_back(std::move(phase));
  std::lock_guard<std::mutex> lock(runtime_->submit_mutex());
  runtime_->pool().run(std::move(job));
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
  for (int t = 0; t < args.tokens; ++t) {
    for (int j = 0; j < k; ++j) {
      const std::size_t index = static_cast<std::size_t>(t) * k + j;
      if (ids[index] < 0) continue;
      const int32_t slot = first_slot[ids[index]]++;
      scratch.slot_token[slot] = t;
      scratch.slot_weight[slot] = weights[index];
    }
  }
}

uint32_t MoEEngine::submit(const ForwardArgs& args) {
  if (args.tokens < 0) throw std::invalid_argument("token count must be >= 0");
  if (args.tokens == 0) return runtime_->pool().launch({});
  if (args.topk < 1) throw std::invalid_argument("top-k must be >= 1");
  if (!args.input || !args.topk_ids || !args.topk_weights || !args.output) {
    throw std::invalid_argument("forward got a null pointer");
  }
  std::lock_guard<std::mutex> lock(runtime_->submit_mutex());
  ThreadPool& pool = runtime_->pool();
  pool.wait_idle();  // the previous job may still use the scratch
  route(args);

  Runtime::Scratch& scratch = runtime_->scratch();
  const int nodes = static_cast<int>(slices_.size());
  const std::size_t tokens = args.tokens, hidden = shape_.hidden;
  const std::size_t slots = scratch.slot_token.size();
  const bool convert_input = args.input_dtype != DType::F32;
  if (convert_input) scratch.input.ensure(tokens * hidden * sizeof(float));
  int longest_slice = 0;
  for (int n = 0; n < nodes; ++n) {
    scratch.hidden[n].ensure(std::max<std::size_t>(1, slots * slices_[n].panels * kPanelWidth) * sizeof(float));
    scratch.partial[n].ensure(tokens * hidden_stride_ * sizeof(float));
    longest_slice = std::max(longest_slice, slices_[n].length);
  }
  const std::size_t worker_floats =
      round_up(2 * std::max<std::size_t>(hidden, longest_slice) * kPanelWidth + 2 * kChunkRows * kPanelWidth, 16);
  scratch.per_worker.ensure(worker_floats * pool.num_threads() * sizeof(float));

  const float* input_rows = convert_input ? scratch.input.as<float>() : static_cast<const float*>(args.input);
  const uint32_t token_blocks = static_cast<uint32_t>((tokens + kTokenBlock - 1) / kTokenBlock);
  const uint32_t active = static_cast<uint32_t>(scratch.active_experts.size());
  std::vector<Phase> job;

  if (convert_input) {
    Phase phase{spread(token_blocks, nodes), {}};
    phase.run = [=, &scratch](int node, uint32_t task, int) {
      const std::size_t block = spread_offset(token_blocks, nodes, node) + task;
      const std::size_t begin = block * kTokenBlock * hidden;
      const std::size_t end = std::min(tokens, (block + 1) * kTokenBlock) * hidden;
      float* out = scratch.input.as<float>();
      for (std::size_t i = begin; i < end; ++i) out[i] = load_as_float(args.input, i, args.input_dtype);
    };
    job.push_back(std::move(phase));
  }

  Phase gate_up{std::vector<uint32_t>(nodes), {}};
  for (int n = 0; n < nodes; ++n) gate_up.tasks_per_node[n] = active * slices_[n].panels;
  gate_up.run = [=, this, &scratch](int node, uint32_t task, int worker) {
    const NodeSlice& slice = slices_[node];
    const kernels::KernelSet& kernels = runtime_->kernels();
    const uint32_t expert_index = task / slice.panels;
    const int panel_index = static_cast<int>(task % slice.panels);
    const int expert = scratch.active_experts[expert_index];
    const int first = scratch.expert_slots[expert_index], last = scratch.expert_slots[expert_index + 1];
    const std::size_t panel_bytes = hidden * kPanelWidth * dtype_size(shape_.weight_dtype);
    const char* gate = slice.gate_up.as<char>() +
                       ((static_cast<std::size_t>(expert) * 2) * slice.panels + panel_index) * panel_bytes;
    const char* up = gate + static_cast<std::size_t>(slice.panels) * panel_bytes;
    float* workspace = scratch.per_worker.as<float>() + worker * worker_floats;
    float* gate_tile = workspace;
    float* up_tile = gate_tile + kChunkRows * kPanelWidth;
    const kernels::FormatKernels* kernel = &kernels[shape_.weight_dtype];
    if (last - first >= kWidenMinRows && shape_.weight_dtype != DType::F32) {
      float* wide_gate = up_tile + kChunkRows * kPanelWidth;
      float* wide_up = wide_gate + hidden * kPanelWidth;
      kernel->widen(gate, static_cast<int>(hidden), wide_gate);
      kernel->widen(up, static_cast<int>(hidden), wide_up);
      gate = reinterpret_cast<const char*>(wide_gate);
      up = reinterpret_cast<const char*>(wide_up);
      kernel = &kernels[DType::F32];
    }
    const kernels::ActivationRows activate = kernels.activation.rows[static_cast<int>(shape_.activation)];
    const kernels::ActivationParams params{shape_.swiglu_alpha, shape_.swiglu_limit};
    const int valid = std::min(kPanelWidth, slice.length - panel_index * kPanelWidth);
    const std::size_t hidden_row = static_cast<std::size_t>(slice.panels) * kPanelWidth;
    float* hidden_out = scratch.hidden[node].as<float>();
    const float* rows[kChunkRows];
    float* gate_rows[kChunkRows];
    float* up_rows[kChunkRows];
    for (int chunk = first; chunk < last; chunk += kChunkRows) {
      const int count = std::min(kChunkRows, last - chunk);
      for (int i = 0; i < count; ++i) {
        rows[i] = input_rows + static_cast<std::size_t>(scratch.slot_token[chunk + i]) * hidden;
        gate_rows[i] = gate_tile + i * kPanelWidth;
        up_rows[i] = up_tile + i * kPanelWidth;
      }
      kernel->gemm(rows, count, gate, static_cast<int>(hidden), gate_rows, false);
      kernel->gemm(rows, count, up, static_cast<int>(hidden), up_rows, false);
      for (int i = 0; i < count; ++i) {
        activate(gate_rows[i], up_rows[i], valid, scratch.slot_weight[chunk + i], params,
                 hidden_out + (chunk + i) * hidden_row + panel_index * kPanelWidth);
      }
    }
  };
  job.push_back(std::move(gate_up));

  Phase down{std::vector<uint32_t>(nodes, static_cast<uint32_t>(hidden_panels_)), {}};
  down.run = [=, this, &scratch](int node, uint32_t panel_index, int worker) {
    const NodeSlice& slice = slices_[node];
    float* partial = scratch.partial[node].as<float>();
    for (std::size_t t = 0; t < tokens; ++t) {
      std::fill_n(partial + t * hidden_stride_ + panel_index * kPanelWidth, kPanelWidth, 0.0f);
    }
    if (slice.length == 0) return;
    const kernels::KernelSet& kernels = runtime_->kernels();
    const std::size_t panel_bytes = static_cast<std::size_t>(slice.length) * kPanelWidth * dtype_size(shape_.weight_dtype);
    const std::size_t hidden_row = static_cast<std::size_t>(slice.panels) * kPanelWidth;
    const float* hidden_in = scratch.hidden[node].as<float>();
    float* wide = scratch.per_worker.as<float>() + worker * worker_floats + 2 * kChunkRows * kPanelWidth;
    const float* rows[kChunkRows];
    float* out_rows[kChunkRows];
    for (uint32_t expert_index = 0; expert_index < active; ++expert_index) {
      const int expert = scratch.active_experts[expert_index];
      const int first = scratch.expert_slots[expert_index], last = scratch.expert_slots[expert_index + 1];
      const char* panel = slice.down.as<char>() +
                          (static_cast<std::size_t>(expert) * hidden_panels_ + panel_index) * panel_bytes;
      const kernels::FormatKernels* kernel = &kernels[shape_.weight_dtype];
      if (last - first >= kWidenMinRows && shape_.weight_dtype != DType::F32) {
        kernel->widen(panel, slice.length, wide);
        panel = reinterpret_cast<const char*>(wide);
        kernel = &kernels[DType::F32];
      }
      for (int chunk = first; chunk < last; chunk += kChunkRows) {
        const int count = std::min(kChunkRows, last - chunk);
        for (int i = 0; i < count; ++i) {
          rows[i] = hidden_in + (chunk + i) * hidden_row;
          out_rows[i] = partial + static_cast<std::size_t>(scratch.slot_token[chunk + i]) * hidden_stride_ +
                        panel_index * kPanelWidth;
        }
        kernel->gemm(rows, count, panel, slice.length, out_rows, true);
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
  return pool.launch(std::move(job));
}

}  // namespace lk
