// MoEEngine's forward: routing and the plan on the submitting thread, then one job whose
// phases run on the executor's workers (lk/job.h).
#include <algorithm>
#include <atomic>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>

#include "lk/job_planning.h"
#include "lk/moe_engine.h"

namespace lk {

uint32_t MoEEngine::submit(const ForwardArgs& args) {
  if (args.tokens < 0) throw std::invalid_argument("token count must be >= 0");
  forward_calls_.fetch_add(1, std::memory_order_relaxed);
  if (args.tokens == 0) return runtime_->executor().launch({});
  if (args.topk < 1) throw std::invalid_argument("top-k must be >= 1");
  if (!args.input || !args.topk_ids || !args.topk_weights || !args.output) {
    throw std::invalid_argument("forward got a null pointer");
  }
  std::lock_guard<std::mutex> lock(runtime_->submit_mutex());
  Executor& executor = runtime_->executor();
  executor.wait_idle();  // the previous job may still use the scratch and plan_
  read_routing(args);
  assign_slots(args.tokens, args.topk);
  plan_forward(args);

  const int nodes = static_cast<int>(slices_.size());
  std::vector<Phase> job;
  if (plan_.convert_input || plan_.integer_rows) {
    job.push_back({spread(plan_.token_blocks, nodes),
                   [this](int node, uint32_t task, int) { prepare_input(node, task); }});
  }
  job.push_back({plan_.gate_up_tasks, [this](int node, uint32_t task, int worker) { gate_up(node, task, worker); }});
  if (plan_.unit_in_use) {
    job.push_back({std::vector<uint32_t>(nodes, plan_.first_chunk.back()),
                   [this](int node, uint32_t chunk, int) { stage_down(node, chunk); }});
  }
  job.push_back({std::vector<uint32_t>(nodes, plan_.down_tasks),
                 [this](int node, uint32_t task, int worker) { down(node, task, worker); }});
  job.push_back({spread(plan_.token_blocks, nodes), [this](int node, uint32_t task, int) { combine(node, task); }});
  return executor.launch(std::move(job));
}

// The ids and weights of every (token, k) into plan_.ids and plan_.weights, and each
// expert's token count.
void MoEEngine::read_routing(const ForwardArgs& args) {
  ForwardPlan& plan = plan_;
  const int experts = shape_.experts, k = args.topk;
  plan.expert_tokens.assign(experts, 0);
  plan.ids.resize(static_cast<std::size_t>(args.tokens) * k);
  plan.weights.resize(plan.ids.size());
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
      plan.ids[index] = static_cast<int32_t>(id);
      plan.weights[index] = load_as_float(args.topk_weights, index, args.weights_dtype);
      if (id < 0) continue;
      // The same expert twice for one token counts once with the summed weight, so an
      // output row never receives two concurrent updates from one kernel call.
      bool merged = false;
      for (int earlier = 0; earlier < j && !merged; ++earlier) {
        const std::size_t other = static_cast<std::size_t>(t) * k + earlier;
        if (plan.ids[other] == id) {
          plan.weights[other] += plan.weights[index];
          plan.ids[index] = -1;
          merged = true;
        }
      }
      if (!merged) ++plan.expert_tokens[id];
    }
  }
}

// Slots grouped by expert, tokens ascending within each (ForwardPlan).
void MoEEngine::assign_slots(int tokens, int topk) {
  ForwardPlan& plan = plan_;
  plan.active_experts.clear();
  plan.expert_slots.assign(1, 0);
  plan.next_slot.assign(shape_.experts, 0);
  for (int e = 0; e < shape_.experts; ++e) {
    if (plan.expert_tokens[e] == 0) continue;
    plan.next_slot[e] = plan.expert_slots.back();
    plan.active_experts.push_back(e);
    plan.expert_slots.push_back(plan.expert_slots.back() + plan.expert_tokens[e]);
  }
  const std::size_t slots = static_cast<std::size_t>(plan.expert_slots.back());
  plan.slot_token.resize(slots);
  plan.slot_weight.resize(slots);
  // The gated activations are the down projection's input: scaled as the kernels read it.
  const float activation_scale = runtime_->kernels()[shape_.format].activation_scale;
  for (int t = 0; t < tokens; ++t) {
    for (int j = 0; j < topk; ++j) {
      const std::size_t index = static_cast<std::size_t>(t) * topk + j;
      if (plan.ids[index] < 0) continue;
      const int32_t slot = plan.next_slot[plan.ids[index]]++;
      plan.slot_token[slot] = t;
      plan.slot_weight[slot] = plan.weights[index] * activation_scale;
    }
  }
}

void MoEEngine::plan_forward(const ForwardArgs& args) {
  ForwardPlan& plan = plan_;
  Runtime::Scratch& scratch = runtime_->scratch();
  const std::size_t tokens = args.tokens, hidden = shape_.hidden;
  const kernels::FormatKernels& format_kernels = runtime_->kernels()[shape_.format];
  const int chunk_rows = format_kernels.chunk_rows;
  plan.args = args;
  plan.kernels = &format_kernels;
  // Where the kernels read activations scaled, the input is copied scaled (the hidden rows
  // are, by their routing weights: assign_slots).
  plan.convert_input = args.input_dtype != DType::F32 || format_kernels.activation_scale != 1.0f;
  if (plan.convert_input) scratch.input.ensure(tokens * hidden * sizeof(float));
  plan.input_rows = plan.convert_input ? scratch.input.as<float>() : static_cast<const float*>(args.input);
  // Integer kernels read activations quantized once per forward.
  plan.integer_rows = format_kernels.integer_rows;
  if (plan.integer_rows) scratch.input_q.ensure(input_q_.bytes(tokens));
  plan.token_blocks = static_cast<uint32_t>((tokens + kTokenBlock - 1) / kTokenBlock);

  // Where unit kernels take an expert's rows, gate and up stage them per task (in the
  // worker's buffer), and down's are staged once per chunk, in a phase of their own: every
  // down task walks every expert, so staging per task would repeat the work per task.
  const std::size_t active = plan.active_experts.size();
  plan.unit_in_use = false;
  plan.first_chunk.assign(active + 1, 0);
  for (std::size_t e = 0; e < active; ++e) {
    const int rows = plan.expert_slots[e + 1] - plan.expert_slots[e];
    plan.unit_in_use = plan.unit_in_use || kernels::unit_takes(format_kernels, std::min(rows, chunk_rows));
    plan.first_chunk[e + 1] = plan.first_chunk[e] + static_cast<uint32_t>((rows + chunk_rows - 1) / chunk_rows);
  }
  plan_node_scratch();

  const std::size_t staged_floats =
      format_kernels.stage_rows
          ? round_up(kernels::staged_bytes(format_kernels, chunk_rows, static_cast<int>(hidden)), 64) / sizeof(float)
          : 0;
  const std::size_t widened_floats = kernels::kPanelWorkspaceBytes / sizeof(float);
  plan.worker_floats = round_up(2 * chunk_rows * kPanelWidth + widened_floats + staged_floats, 16);
  Executor& executor = runtime_->executor();
  scratch.per_worker.ensure(plan.worker_floats * executor.num_threads() * sizeof(float));

  const int nodes = static_cast<int>(slices_.size());
  plan.node_threads = (executor.num_threads() + nodes - 1) / nodes;
  plan.gate_up_tasks.resize(nodes);
  for (int n = 0; n < nodes; ++n) {
    const int panels = slices_[n].panels, run = gate_up_run(panels);
    plan.gate_up_tasks[n] = static_cast<uint32_t>(active) * ((panels + run - 1) / run);
  }
  // A down task owns a run of output panels, so it may walk them expert by expert.
  plan.down_run = run_length(hidden_panels_, hidden_panels_, plan.node_threads);
  plan.down_tasks = static_cast<uint32_t>((hidden_panels_ + plan.down_run - 1) / plan.down_run);
}

// Each node's hidden rows (fp32, quantized, staged for the unit), partial outputs, and the
// counters by which gate/up finds the hidden groups it completes.
void MoEEngine::plan_node_scratch() {
  ForwardPlan& plan = plan_;
  Runtime::Scratch& scratch = runtime_->scratch();
  const int nodes = static_cast<int>(slices_.size());
  const std::size_t tokens = plan.args.tokens, slots = plan.slot_token.size();
  const int chunk_rows = plan.kernels->chunk_rows;
  const uint32_t chunks = plan.first_chunk.back();
  plan.groups_done_offset.resize(nodes);
  plan.down_chunk_bytes.assign(nodes, 0);
  std::size_t groups_done_count = 0;
  for (int n = 0; n < nodes; ++n) {
    const NodeSlice& slice = slices_[n];
    scratch.hidden[n].ensure(std::max<std::size_t>(1, slots * slice.panels * kPanelWidth) * sizeof(float));
    scratch.partial[n].ensure(tokens * hidden_stride_ * sizeof(float));
    plan.groups_done_offset[n] = groups_done_count;
    if (plan.integer_rows) {
      scratch.hidden_q[n].ensure(std::max<std::size_t>(1, hidden_q_[n].bytes(slots)));
      groups_done_count += plan.active_experts.size() * hidden_q_[n].groups();
    }
    if (plan.unit_in_use) {
      plan.down_chunk_bytes[n] = round_up(kernels::staged_bytes(*plan.kernels, chunk_rows, slice.length), 64);
      scratch.staged_hidden[n].ensure(std::max<std::size_t>(1, chunks * plan.down_chunk_bytes[n]));
    }
  }
  plan.group_panels_done.assign(groups_done_count, 0);
}

// Gate/up panels per task: a whole node's share where the unit takes the rows (the staged rows
// then serve every panel), else runs of kRunPanels at most.
int MoEEngine::gate_up_run(int panels) const {
  return run_length(plan_.active_experts.size() * panels, panels, plan_.node_threads,
                    plan_.unit_in_use ? panels : kRunPanels);
}

void MoEEngine::prepare_input(int node, uint32_t task) {
  const ForwardPlan& plan = plan_;
  Runtime::Scratch& scratch = runtime_->scratch();
  const std::size_t tokens = plan.args.tokens, hidden = shape_.hidden;
  const std::size_t block = spread_offset(plan.token_blocks, static_cast<int>(slices_.size()), node) + task;
  const std::size_t first = block * kTokenBlock, last = std::min(tokens, (block + 1) * kTokenBlock);
  if (plan.convert_input) {
    const void* input = plan.args.input;
    const DType dtype = plan.args.input_dtype;
    const float scale = plan.kernels->activation_scale;
    float* out = scratch.input.as<float>();
    for (std::size_t i = first * hidden; i < last * hidden; ++i) out[i] = load_as_float(input, i, dtype) * scale;
  }
  if (plan.integer_rows) {
    for (std::size_t t = first; t < last; ++t) {
      input_q_.quantize(plan.input_rows + t * hidden, scratch.input_q.data(), t);
    }
  }
}

// One active expert's rows times a run of the node's gate and up panels, activated into its
// hidden rows.
void MoEEngine::gate_up(int node, uint32_t task, int worker) {
  const ForwardPlan& plan = plan_;
  Runtime::Scratch& scratch = runtime_->scratch();
  const NodeSlice& slice = slices_[node];
  const kernels::KernelSet& kernels = runtime_->kernels();
  const int chunk_rows = plan.kernels->chunk_rows, hidden = shape_.hidden, group = shape_.group_size;
  const int run = gate_up_run(slice.panels), runs = (slice.panels + run - 1) / run;
  const uint32_t expert_index = task / runs;
  const int first_panel = static_cast<int>(task % runs) * run, end_panel = std::min(slice.panels, first_panel + run);
  const int expert = plan.active_experts[expert_index];
  const int first = plan.expert_slots[expert_index], last = plan.expert_slots[expert_index + 1];
  const std::size_t panel_bytes = gate_up_panel_bytes();
  const char* gates = slice.gate_up.as<char>() + static_cast<std::size_t>(expert) * 2 * slice.panels * panel_bytes;
  const char* ups = gates + static_cast<std::size_t>(slice.panels) * panel_bytes;
  float* gate_sums = scratch.per_worker.as<float>() + worker * plan.worker_floats;
  float* up_sums = gate_sums + chunk_rows * kPanelWidth;
  float* widened = up_sums + chunk_rows * kPanelWidth;
  float* staging = widened + kernels::kPanelWorkspaceBytes / sizeof(float);
  const kernels::ActivationRows activate = kernels.activation.rows[static_cast<int>(shape_.activation)];
  const kernels::ActivationParams params{shape_.swiglu_alpha, shape_.swiglu_limit};
  const std::size_t hidden_row = static_cast<std::size_t>(slice.panels) * kPanelWidth;
  float* hidden_out = scratch.hidden[node].as<float>();
  kernels::ActivationRow rows[kMaxChunkRows];
  float* gate_rows[kMaxChunkRows];
  float* up_rows[kMaxChunkRows];
  // Chunk by chunk, so that rows staged for the unit kernels serve every panel of the run.
  for (int chunk = first; chunk < last; chunk += chunk_rows) {
    const int count = std::min(chunk_rows, last - chunk);
    for (int i = 0; i < count; ++i) {
      const std::size_t token = plan.slot_token[chunk + i];
      const float* values = plan.input_rows + token * hidden;
      rows[i] = plan.integer_rows ? input_q_.row(values, scratch.input_q.data(), token)
                                  : kernels::ActivationRow::of_values(values);
      gate_rows[i] = gate_sums + i * kPanelWidth;
      up_rows[i] = up_sums + i * kPanelWidth;
    }
    const void* staged = kernels::stage_for_unit(*plan.kernels, rows, count, hidden, staging);
    for (int panel_index = first_panel; panel_index < end_panel; ++panel_index) {
      const int valid = std::min(kPanelWidth, slice.length - panel_index * kPanelWidth);
      kernels::multiply_two_panels(kernels, shape_.format, gates + panel_index * panel_bytes,
                                   ups + panel_index * panel_bytes, hidden, group, rows, count, gate_rows, up_rows,
                                   false, widened, staged);
      if (!gate_up_bias_.empty()) {
        add_gate_up_bias(expert, slice.begin + panel_index * kPanelWidth, valid, count, gate_sums, up_sums);
      }
      activate(gate_sums, up_sums, count, valid, plan.slot_weight.data() + chunk, params,
               hidden_out + chunk * hidden_row + panel_index * kPanelWidth, hidden_row);
    }
  }
  if (plan.integer_rows) quantize_finished_groups(node, expert_index, first_panel, end_panel);
}

// Counts the panels [first_panel, end_panel) of the expert's hidden groups as done; the
// task that completes a group quantizes it, so down need not wait for a phase of its own.
void MoEEngine::quantize_finished_groups(int node, uint32_t expert_index, int first_panel, int end_panel) {
  ForwardPlan& plan = plan_;
  const NodeSlice& slice = slices_[node];
  const QuantizedRows& records = hidden_q_[node];
  const int group_panels = shape_.group_size / kPanelWidth;
  const int first = plan.expert_slots[expert_index], last = plan.expert_slots[expert_index + 1];
  const std::size_t hidden_row = static_cast<std::size_t>(slice.panels) * kPanelWidth;
  const float* hidden = runtime_->scratch().hidden[node].as<float>();
  void* quantized = runtime_->scratch().hidden_q[node].data();
  uint32_t* groups_done = plan.group_panels_done.data() + plan.groups_done_offset[node] +
                          static_cast<std::size_t>(expert_index) * records.groups();
  for (int g = first_panel / group_panels; g * group_panels < end_panel; ++g) {
    const int group_begin = g * group_panels, group_end = std::min(slice.panels, group_begin + group_panels);
    const uint32_t mine = std::min(end_panel, group_end) - std::max(first_panel, group_begin);
    // acq_rel: the task that completes the group sees every other task's hidden values.
    const uint32_t before = std::atomic_ref<uint32_t>(groups_done[g]).fetch_add(mine, std::memory_order_acq_rel);
    if (before + mine != static_cast<uint32_t>(group_end - group_begin)) continue;
    for (int slot = first; slot < last; ++slot) records.quantize_group(hidden + slot * hidden_row, quantized, slot, g);
  }
}

// A hidden row (the down projection's input) as the kernels read it.
kernels::ActivationRow MoEEngine::down_row(int node, std::size_t slot) const {
  const Runtime::Scratch& scratch = runtime_->scratch();
  const std::size_t hidden_row = static_cast<std::size_t>(slices_[node].panels) * kPanelWidth;
  const float* values = scratch.hidden[node].as<float>() + slot * hidden_row;
  return plan_.integer_rows ? hidden_q_[node].row(values, scratch.hidden_q[node].data(), slot)
                            : kernels::ActivationRow::of_values(values);
}

// One chunk of an expert's hidden rows, staged once for the unit kernels where they take it.
void MoEEngine::stage_down(int node, uint32_t chunk) {
  const ForwardPlan& plan = plan_;
  if (slices_[node].length == 0) return;
  const int chunk_rows = plan.kernels->chunk_rows;
  const auto expert_index = static_cast<std::size_t>(
      std::upper_bound(plan.first_chunk.begin(), plan.first_chunk.end(), chunk) - plan.first_chunk.begin() - 1);
  const int first =
      plan.expert_slots[expert_index] + static_cast<int>(chunk - plan.first_chunk[expert_index]) * chunk_rows;
  const int count = std::min(chunk_rows, plan.expert_slots[expert_index + 1] - first);
  if (!kernels::unit_takes(*plan.kernels, count)) return;
  kernels::ActivationRow rows[kMaxChunkRows];
  for (int i = 0; i < count; ++i) rows[i] = down_row(node, first + i);
  kernels::stage_for_unit(*plan.kernels, rows, count, slices_[node].length,
                          runtime_->scratch().staged_hidden[node].as<uint8_t>() + chunk * plan.down_chunk_bytes[node]);
}

// A run of the node's output panels over every active expert's hidden rows, into the
// node's partial output.
void MoEEngine::down(int node, uint32_t task, int worker) {
  const ForwardPlan& plan = plan_;
  Runtime::Scratch& scratch = runtime_->scratch();
  const NodeSlice& slice = slices_[node];
  const int first_panel = static_cast<int>(task) * plan.down_run;
  const int end_panel = std::min(hidden_panels_, first_panel + plan.down_run);
  const std::size_t tokens = plan.args.tokens;
  float* partial = scratch.partial[node].as<float>();
  for (std::size_t t = 0; t < tokens; ++t) {
    float* row = partial + t * hidden_stride_;
    std::fill(row + first_panel * kPanelWidth, row + end_panel * kPanelWidth, 0.0f);
  }
  if (slice.length == 0) return;
  const kernels::KernelSet& kernels = runtime_->kernels();
  const int chunk_rows = plan.kernels->chunk_rows, group = shape_.group_size;
  const std::size_t panel_bytes = down_panel_bytes(slice);
  float* widened = scratch.per_worker.as<float>() + worker * plan.worker_floats + 2 * chunk_rows * kPanelWidth;
  // Where the ISA reads two panels side by side, panel p goes with p + half of the run, so
  // that each of the two streams walks consecutive panels and its prefetch runs on into the
  // panel it reads next.
  const int run = end_panel - first_panel;
  const int half = plan.kernels->gemm_pair != nullptr ? run / 2 : 0;
  kernels::ActivationRow rows[kMaxChunkRows];
  float* out_rows[kMaxChunkRows];
  float* partner_out_rows[kMaxChunkRows];
  for (std::size_t expert_index = 0; expert_index < plan.active_experts.size(); ++expert_index) {
    const int expert = plan.active_experts[expert_index];
    const int first = plan.expert_slots[expert_index], last = plan.expert_slots[expert_index + 1];
    for (int chunk = first; chunk < last; chunk += chunk_rows) {
      const int count = std::min(chunk_rows, last - chunk);
      for (int i = 0; i < count; ++i) rows[i] = down_row(node, chunk + i);
      const uint32_t staged_chunk =
          plan.first_chunk[expert_index] + static_cast<uint32_t>((chunk - first) / chunk_rows);
      const void* staged = kernels::unit_takes(*plan.kernels, count)
                               ? scratch.staged_hidden[node].as<uint8_t>() + staged_chunk * plan.down_chunk_bytes[node]
                               : nullptr;
      for (int step = 0; step < run - half; ++step) {
        const bool paired = step < half;
        const int panel_index = first_panel + (paired ? step : half + step);
        const char* panel =
            slice.down.as<char>() + (static_cast<std::size_t>(expert) * hidden_panels_ + panel_index) * panel_bytes;
        for (int i = 0; i < count; ++i) {
          out_rows[i] = partial + static_cast<std::size_t>(plan.slot_token[chunk + i]) * hidden_stride_ +
                        panel_index * kPanelWidth;
          partner_out_rows[i] = out_rows[i] + half * kPanelWidth;
        }
        if (paired) {
          kernels::multiply_two_panels(kernels, shape_.format, panel, panel + half * panel_bytes, slice.length, group,
                                       rows, count, out_rows, partner_out_rows, true, widened, staged);
        } else {
          kernels::multiply_panel(kernels, shape_.format, panel, slice.length, group, rows, count, out_rows, true,
                                  widened, staged);
        }
      }
    }
  }
}

// The nodes' partial outputs of a block of tokens, summed into the output.
void MoEEngine::combine(int node, uint32_t task) {
  const ForwardPlan& plan = plan_;
  const Runtime::Scratch& scratch = runtime_->scratch();
  const int nodes = static_cast<int>(slices_.size());
  const std::size_t tokens = plan.args.tokens, hidden = shape_.hidden;
  void* output = plan.args.output;
  const DType dtype = plan.args.output_dtype;
  const std::size_t block = spread_offset(plan.token_blocks, nodes, node) + task;
  const std::size_t end = std::min(tokens, (block + 1) * kTokenBlock);
  for (std::size_t t = block * kTokenBlock; t < end; ++t) {
    for (std::size_t h = 0; h < hidden; ++h) {
      float sum = 0.0f;
      for (int n = 0; n < nodes; ++n) sum += scratch.partial[n].as<float>()[t * hidden_stride_ + h];
      if (!down_bias_.empty()) sum += down_bias(t, h);
      store_from_float(output, t * hidden + h, dtype, sum);
    }
  }
}

// The expert's gate and up biases of intermediate rows [first_row, first_row + valid), added
// to a chunk's sums before the activation.
void MoEEngine::add_gate_up_bias(int expert, int first_row, int valid, int count, float* gate_sums,
                                 float* up_sums) const {
  const float* gate_bias = gate_up_bias_.data() + static_cast<std::size_t>(expert) * 2 * shape_.intermediate + first_row;
  const float* up_bias = gate_bias + shape_.intermediate;
  for (int i = 0; i < count; ++i) {
    for (int j = 0; j < valid; ++j) {
      gate_sums[i * kPanelWidth + j] += gate_bias[j];
      up_sums[i * kPanelWidth + j] += up_bias[j];
    }
  }
}

// The token's experts' down biases at output column h, each times its routing weight
// (repeats merged: read_routing).
float MoEEngine::down_bias(std::size_t token, std::size_t h) const {
  const int topk = plan_.args.topk;
  float sum = 0.0f;
  for (int j = 0; j < topk; ++j) {
    const int32_t expert = plan_.ids[token * topk + j];
    if (expert >= 0) sum += plan_.weights[token * topk + j] * down_bias_[static_cast<std::size_t>(expert) * shape_.hidden + h];
  }
  return sum;
}

}  // namespace lk
