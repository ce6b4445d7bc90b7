#include "lk/linear_engine.h"

#include <algorithm>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>

#include "lk/job_planning.h"

namespace lk {
namespace {

// Panels one packing task writes: enough to amortize its scratch.
constexpr int kPackPanels = 16;

bool is_float_format(WeightFormat format) {
  return format == WeightFormat::F32 || format == WeightFormat::F16 || format == WeightFormat::BF16;
}

}  // namespace

LinearEngine::LinearEngine(std::shared_ptr<Runtime> runtime, const WeightSource& weight, int outputs, int inputs,
                           WeightFormat format, int group)
    : runtime_(std::move(runtime)), outputs_(outputs), inputs_(inputs), format_(format),
      group_(is_grouped(format) ? group : 0) {
  if (!runtime_) throw std::invalid_argument("runtime is null");
  if (outputs < 1 || inputs < 1) {
    throw std::invalid_argument("a linear layer needs >= 1 outputs and inputs, got " + std::to_string(outputs) + " x " +
                                std::to_string(inputs));
  }
  check_source(weight, "weight");
  if (!is_float_format(weight.format)) {
    throw std::invalid_argument(std::string("linear weights must be float32, float16 or bfloat16, got ") +
                                format_name(weight.format));
  }
  if (format != weight.format && format != WeightFormat::Int8 && format != WeightFormat::Int4) {
    throw std::invalid_argument(std::string("a linear layer keeps its weight as it is, in int8 or in int4, not in ") +
                                format_name(format));
  }
  if (is_grouped(format) && (group < 16 || group % 16 != 0)) {
    throw std::invalid_argument("group size " + std::to_string(group) + " must be a positive multiple of 16");
  }
  panel_bytes_ = panel_bytes(format_, inputs, group_);
  const int panels = static_cast<int>(round_up(outputs, kPanelWidth) / kPanelWidth);
  const int nodes = runtime_->topology().num_nodes();
  nodes_.resize(nodes);
  for (int n = 0; n < nodes; ++n) {
    nodes_[n].first = static_cast<int>(spread_offset(panels, nodes, n));
    nodes_[n].count = static_cast<int>(spread_offset(panels, nodes, n + 1)) - nodes_[n].first;
    nodes_[n].panels = HostBuffer(std::max<std::size_t>(1, nodes_[n].count * panel_bytes_));
  }
  if (runtime_->kernels()[format_].integer_rows) input_q_ = QuantizedRows(format_, inputs, group_);
  pack(weight);
}

std::size_t LinearEngine::weight_bytes() const {
  std::size_t total = 0;
  for (const NodePanels& node : nodes_) total += node.count * panel_bytes_;
  return total;
}

std::size_t LinearEngine::planned_bytes(int outputs, int inputs, WeightFormat format, int group) {
  const std::size_t panels = round_up(outputs, kPanelWidth) / kPanelWidth;
  return panels * panel_bytes(format, inputs, is_grouped(format) ? group : 0);
}

void LinearEngine::pack(const WeightSource& weight) {
  std::vector<uint32_t> tasks;
  for (const NodePanels& node : nodes_) tasks.push_back((node.count + kPackPanels - 1) / kPackPanels);
  pack_on_workers(*runtime_, tasks, [&](int node, uint32_t task) {
    const NodePanels& mine = nodes_[node];
    const SourceMatrix source{.source = weight,
                              .rows = static_cast<std::size_t>(outputs_),
                              .cols = static_cast<std::size_t>(inputs_),
                              .expert = 0};
    PackScratch scratch;
    int rows[kPanelWidth];
    const int first = static_cast<int>(task) * kPackPanels, last = std::min(mine.count, first + kPackPanels);
    for (int p = first; p < last; ++p) {
      for (int j = 0; j < kPanelWidth; ++j) {
        const int row = (mine.first + p) * kPanelWidth + j;
        rows[j] = row < outputs_ ? row : -1;
      }
      pack_panel(source, rows, 0, inputs_, format_, group_, scratch, mine.panels.as<uint8_t>() + p * panel_bytes_);
    }
  });
}

uint32_t LinearEngine::submit(const LinearArgs& args) {
  if (args.rows < 0) throw std::invalid_argument("row count must be >= 0");
  forward_calls_.fetch_add(1, std::memory_order_relaxed);
  if (args.rows == 0) return runtime_->executor().launch({});
  if (!args.input || !args.output) throw std::invalid_argument("linear forward got a null pointer");
  std::lock_guard<std::mutex> lock(runtime_->submit_mutex());
  Executor& executor = runtime_->executor();
  executor.wait_idle();  // the previous job may still use the scratch and plan_
  plan_forward(args);

  const int nodes = static_cast<int>(nodes_.size());
  std::vector<Phase> job;
  if (plan_.convert_input || plan_.integer_rows) {
    job.push_back({spread(plan_.row_blocks, nodes),
                   [this](int node, uint32_t task, int) { prepare_input(node, task); }});
  }
  job.push_back({plan_.multiply_tasks, [this](int node, uint32_t task, int worker) { multiply(node, task, worker); }});
  return executor.launch(std::move(job));
}

void LinearEngine::plan_forward(const LinearArgs& args) {
  ForwardPlan& plan = plan_;
  Runtime::Scratch& scratch = runtime_->scratch();
  Executor& executor = runtime_->executor();
  const kernels::FormatKernels& format_kernels = runtime_->kernels()[format_];
  const int chunk_rows = format_kernels.chunk_rows;
  const std::size_t rows = args.rows, inputs = inputs_;
  plan.args = args;
  // The kernels read fp32 rows, times the format's activation scale.
  plan.convert_input = args.input_dtype != DType::F32 || format_kernels.activation_scale != 1.0f;
  if (plan.convert_input) scratch.input.ensure(rows * inputs * sizeof(float));
  plan.input_rows = plan.convert_input ? scratch.input.as<float>() : static_cast<const float*>(args.input);
  // Integer kernels read activations quantized once per forward.
  plan.integer_rows = format_kernels.integer_rows;
  if (plan.integer_rows) scratch.input_q.ensure(input_q_.bytes(rows));
  plan.row_blocks = static_cast<uint32_t>((rows + kTokenBlock - 1) / kTokenBlock);

  const std::size_t staged_floats =
      format_kernels.stage_rows
          ? round_up(kernels::staged_bytes(format_kernels, chunk_rows, inputs_), 64) / sizeof(float)
          : 0;
  const std::size_t widened_floats = kernels::kPanelWorkspaceBytes / sizeof(float);
  plan.sum_floats = static_cast<std::size_t>(chunk_rows) * kPanelWidth;
  plan.worker_floats = round_up(2 * plan.sum_floats + widened_floats + staged_floats, 16);
  scratch.per_worker.ensure(plan.worker_floats * executor.num_threads() * sizeof(float));

  // A task multiplies one chunk of rows by a run of its node's panels.
  const int nodes = static_cast<int>(nodes_.size());
  plan.row_chunks = static_cast<uint32_t>((rows + chunk_rows - 1) / chunk_rows);
  const int node_threads = (executor.num_threads() + nodes - 1) / nodes;
  plan.run.resize(nodes);
  plan.multiply_tasks.resize(nodes);
  for (int n = 0; n < nodes; ++n) {
    const int panels = nodes_[n].count;
    plan.run[n] = run_length(static_cast<std::size_t>(plan.row_chunks) * panels, panels, node_threads);
    plan.multiply_tasks[n] = plan.row_chunks * static_cast<uint32_t>((panels + plan.run[n] - 1) / plan.run[n]);
  }
}

// A block of rows as the kernels read them: fp32 times the format's activation scale, and
// quantized where the kernels multiply integers.
void LinearEngine::prepare_input(int node, uint32_t task) {
  const ForwardPlan& plan = plan_;
  Runtime::Scratch& scratch = runtime_->scratch();
  const std::size_t rows = plan.args.rows, inputs = inputs_;
  const std::size_t block = spread_offset(plan.row_blocks, static_cast<int>(nodes_.size()), node) + task;
  const std::size_t first = block * kTokenBlock, last = std::min(rows, (block + 1) * kTokenBlock);
  if (plan.convert_input) {
    const void* input = plan.args.input;
    const DType dtype = plan.args.input_dtype;
    const float scale = runtime_->kernels()[format_].activation_scale;
    float* out = scratch.input.as<float>();
    for (std::size_t i = first * inputs; i < last * inputs; ++i) out[i] = load_as_float(input, i, dtype) * scale;
  }
  if (plan.integer_rows) {
    for (std::size_t r = first; r < last; ++r) input_q_.quantize(plan.input_rows + r * inputs, scratch.input_q.data(), r);
  }
}

// One chunk of rows times a run of the node's panels, plus bias, into the output.
void LinearEngine::multiply(int node, uint32_t task, int worker) {
  const ForwardPlan& plan = plan_;
  const NodePanels& mine = nodes_[node];
  const kernels::KernelSet& kernels = runtime_->kernels();
  const int chunk_rows = kernels[format_].chunk_rows;
  const std::size_t inputs = inputs_, outputs = outputs_, sum_floats = plan.sum_floats;
  const int first_panel = static_cast<int>(task / plan.row_chunks) * plan.run[node];
  const int end_panel = std::min(mine.count, first_panel + plan.run[node]);
  const std::size_t first_row = static_cast<std::size_t>(task % plan.row_chunks) * chunk_rows;
  const int count = static_cast<int>(std::min<std::size_t>(chunk_rows, plan.args.rows - first_row));
  float* sums = runtime_->scratch().per_worker.as<float>() + worker * plan.worker_floats;
  float* widened = sums + 2 * sum_floats;
  float* staging = widened + kernels::kPanelWorkspaceBytes / sizeof(float);
  kernels::ActivationRow a_rows[kMaxChunkRows];
  float* first_out[kMaxChunkRows];
  float* second_out[kMaxChunkRows];
  const void* records = runtime_->scratch().input_q.data();
  for (int i = 0; i < count; ++i) {
    const float* values = plan.input_rows + (first_row + i) * inputs;
    a_rows[i] = plan.integer_rows ? input_q_.row(values, records, first_row + i)
                                  : kernels::ActivationRow::of_values(values);
    first_out[i] = sums + i * kPanelWidth;
    second_out[i] = sums + sum_floats + i * kPanelWidth;
  }
  const void* staged = kernels::stage_for_unit(kernels[format_], a_rows, count, inputs_, staging);
  const void* bias = plan.args.bias;
  void* output = plan.args.output;
  const DType bias_dtype = plan.args.bias_dtype, output_dtype = plan.args.output_dtype;
  // The sums of panel p (local), plus bias, into the output's rows and columns.
  const auto store = [&](int p, const float* panel_sums) {
    const std::size_t first_col = static_cast<std::size_t>(mine.first + p) * kPanelWidth;
    const int valid = static_cast<int>(std::min<std::size_t>(kPanelWidth, outputs - first_col));
    for (int i = 0; i < count; ++i) {
      const std::size_t out_row = (first_row + i) * outputs + first_col;
      for (int j = 0; j < valid; ++j) {
        const float added = bias ? load_as_float(bias, first_col + j, bias_dtype) : 0.0f;
        store_from_float(output, out_row + j, output_dtype, panel_sums[i * kPanelWidth + j] + added);
      }
    }
  };
  // Where the ISA reads two panels side by side, panel p goes with p + half of the run, so
  // each stream walks consecutive panels (as the MoE down projection does).
  const int length = end_panel - first_panel;
  const int half = kernels[format_].gemm_pair != nullptr ? length / 2 : 0;
  const uint8_t* base = mine.panels.as<uint8_t>();
  for (int step = 0; step < length - half; ++step) {
    const bool paired = step < half;
    const int p = first_panel + (paired ? step : half + step);
    if (paired) {
      kernels::multiply_two_panels(kernels, format_, base + p * panel_bytes_, base + (p + half) * panel_bytes_, inputs_,
                                   group_, a_rows, count, first_out, second_out, false, widened, staged);
      store(p, sums);
      store(p + half, sums + sum_floats);
    } else {
      kernels::multiply_panel(kernels, format_, base + p * panel_bytes_, inputs_, group_, a_rows, count, first_out, false,
                              widened, staged);
      store(p, sums);
    }
  }
}

}  // namespace lk
