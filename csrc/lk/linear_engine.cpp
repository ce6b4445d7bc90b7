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

LinearEngine::LinearEngine(std::shared_ptr<Runtime> runtime, const WeightSource& weight, int outputs, int inputs)
    : runtime_(std::move(runtime)), outputs_(outputs), inputs_(inputs), format_(weight.format) {
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
  panel_bytes_ = panel_bytes(format_, inputs, 0);
  const int panels = static_cast<int>(round_up(outputs, kPanelWidth) / kPanelWidth);
  const int nodes = runtime_->topology().num_nodes();
  nodes_.resize(nodes);
  for (int n = 0; n < nodes; ++n) {
    nodes_[n].first = static_cast<int>(spread_offset(panels, nodes, n));
    nodes_[n].count = static_cast<int>(spread_offset(panels, nodes, n + 1)) - nodes_[n].first;
    nodes_[n].panels = HostBuffer(std::max<std::size_t>(1, nodes_[n].count * panel_bytes_));
  }
  pack(weight);
}

std::size_t LinearEngine::weight_bytes() const {
  std::size_t total = 0;
  for (const NodePanels& node : nodes_) total += node.count * panel_bytes_;
  return total;
}

void LinearEngine::pack(const WeightSource& weight) {
  std::vector<uint32_t> tasks;
  for (const NodePanels& node : nodes_) tasks.push_back((node.count + kPackPanels - 1) / kPackPanels);
  pack_on_workers(*runtime_, tasks, [&](int node, uint32_t task) {
    const NodePanels& mine = nodes_[node];
    const SourceMatrix source{weight, static_cast<std::size_t>(outputs_), static_cast<std::size_t>(inputs_), 0};
    PackScratch scratch;
    int rows[kPanelWidth];
    const int first = static_cast<int>(task) * kPackPanels, last = std::min(mine.count, first + kPackPanels);
    for (int p = first; p < last; ++p) {
      for (int j = 0; j < kPanelWidth; ++j) {
        const int row = (mine.first + p) * kPanelWidth + j;
        rows[j] = row < outputs_ ? row : -1;
      }
      pack_panel(source, rows, 0, inputs_, format_, 0, scratch, mine.panels.as<uint8_t>() + p * panel_bytes_);
    }
  });
}

uint32_t LinearEngine::submit(const LinearArgs& args) {
  if (args.rows < 0) throw std::invalid_argument("row count must be >= 0");
  if (args.rows == 0) return runtime_->executor().launch({});
  if (!args.input || !args.output) throw std::invalid_argument("linear forward got a null pointer");
  std::lock_guard<std::mutex> lock(runtime_->submit_mutex());
  Executor& executor = runtime_->executor();
  executor.wait_idle();  // the previous job may still use the scratch

  Runtime::Scratch& scratch = runtime_->scratch();
  const kernels::FormatKernels& format_kernels = runtime_->kernels()[format_];
  const int chunk_rows = format_kernels.chunk_rows;
  const std::size_t rows = args.rows, inputs = inputs_, outputs = outputs_;
  // The kernels read fp32 rows, times the format's activation scale.
  const float activation_scale = format_kernels.activation_scale;
  const bool convert_input = args.input_dtype != DType::F32 || activation_scale != 1.0f;
  if (convert_input) scratch.input.ensure(rows * inputs * sizeof(float));
  const float* input_rows = convert_input ? scratch.input.as<float>() : static_cast<const float*>(args.input);

  const std::size_t packed_floats =
      format_kernels.pack_rows ? round_up(kernels::packed_bytes(format_kernels, chunk_rows, inputs_), 64) / sizeof(float) : 0;
  const std::size_t widened_floats = kernels::kPanelWorkspaceBytes / sizeof(float);
  const std::size_t tile_floats = static_cast<std::size_t>(chunk_rows) * kPanelWidth;
  const std::size_t worker_floats = round_up(2 * tile_floats + widened_floats + packed_floats, 16);
  scratch.per_worker.ensure(worker_floats * executor.num_threads() * sizeof(float));

  const int nodes = static_cast<int>(nodes_.size());
  std::vector<Phase> job;
  if (convert_input) {
    const uint32_t blocks = static_cast<uint32_t>((rows + kTokenBlock - 1) / kTokenBlock);
    Phase phase{spread(blocks, nodes), {}};
    phase.run = [=, &scratch](int node, uint32_t task, int) {
      const std::size_t block = spread_offset(blocks, nodes, node) + task;
      const std::size_t end = std::min(rows, (block + 1) * kTokenBlock) * inputs;
      float* out = scratch.input.as<float>();
      for (std::size_t i = block * kTokenBlock * inputs; i < end; ++i) {
        out[i] = load_as_float(args.input, i, args.input_dtype) * activation_scale;
      }
    };
    job.push_back(std::move(phase));
  }

  // A task multiplies one chunk of rows by a run of its node's panels.
  const uint32_t row_chunks = static_cast<uint32_t>((rows + chunk_rows - 1) / chunk_rows);
  const int node_threads = (executor.num_threads() + nodes - 1) / nodes;
  std::vector<int> run(nodes);
  Phase multiply{std::vector<uint32_t>(nodes), {}};
  for (int n = 0; n < nodes; ++n) {
    run[n] = run_length(static_cast<std::size_t>(row_chunks) * nodes_[n].count, nodes_[n].count, node_threads);
    multiply.tasks_per_node[n] = row_chunks * static_cast<uint32_t>((nodes_[n].count + run[n] - 1) / run[n]);
  }
  multiply.run = [=, this, &scratch](int node, uint32_t task, int worker) {
    const NodePanels& mine = nodes_[node];
    const kernels::KernelSet& kernels = runtime_->kernels();
    const int first_panel = static_cast<int>(task / row_chunks) * run[node];
    const int end_panel = std::min(mine.count, first_panel + run[node]);
    const std::size_t first_row = static_cast<std::size_t>(task % row_chunks) * chunk_rows;
    const int count = static_cast<int>(std::min<std::size_t>(chunk_rows, rows - first_row));
    float* tiles = scratch.per_worker.as<float>() + worker * worker_floats;
    float* widened = tiles + 2 * tile_floats;
    float* packing = widened + widened_floats;
    kernels::ActivationRow a_rows[kMaxChunkRows];
    float* first_out[kMaxChunkRows];
    float* second_out[kMaxChunkRows];
    for (int i = 0; i < count; ++i) {
      a_rows[i] = {input_rows + (first_row + i) * inputs, nullptr, nullptr, nullptr, nullptr, nullptr};
      first_out[i] = tiles + i * kPanelWidth;
      second_out[i] = tiles + tile_floats + i * kPanelWidth;
    }
    const void* packed = kernels::pack_for_tiles(kernels[format_], a_rows, count, inputs_, packing);
    // The sums of panel p (local), plus bias, into the output's rows and columns.
    const auto store = [&](int p, const float* tile) {
      const std::size_t first_col = static_cast<std::size_t>(mine.first + p) * kPanelWidth;
      const int valid = static_cast<int>(std::min<std::size_t>(kPanelWidth, outputs - first_col));
      for (int i = 0; i < count; ++i) {
        const std::size_t out_row = (first_row + i) * outputs + first_col;
        for (int j = 0; j < valid; ++j) {
          const float bias = args.bias ? load_as_float(args.bias, first_col + j, args.bias_dtype) : 0.0f;
          store_from_float(args.output, out_row + j, args.output_dtype, tile[i * kPanelWidth + j] + bias);
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
                                     0, a_rows, count, first_out, second_out, false, widened, packed);
        store(p, tiles);
        store(p + half, tiles + tile_floats);
      } else {
        kernels::multiply_panel(kernels, format_, base + p * panel_bytes_, inputs_, 0, a_rows, count, first_out, false,
                                widened, packed);
        store(p, tiles);
      }
    }
  };
  job.push_back(std::move(multiply));
  return executor.launch(std::move(job));
}

}  // namespace lk
