// One MoE layer's routed experts, in the engine's own layout, split across NUMA nodes:
// node n holds rows [begin_n, end_n) of every expert's intermediate dimension (its gate,
// up and the matching columns of down), so every node works on every expert and reads only
// its own memory; the nodes' partial outputs are summed at the end.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "lk/activation_rows.h"
#include "lk/common.h"
#include "lk/formats.h"
#include "lk/host_buffer.h"
#include "lk/runtime.h"
#include "lk/weight_packing.h"

namespace lk {

struct ExpertShape {
  int experts = 0;
  int hidden = 0;        // H
  int intermediate = 0;  // I
  WeightFormat format = WeightFormat::BF16;  // how the engine stores the weights
  int group_size = 128;  // quantization group along the input dimension (grouped formats)
  Activation activation = Activation::Silu;
  float swiglu_alpha = 1.702f;  // SwigluOai only
  float swiglu_limit = 7.0f;    // SwigluOai only
};

// One forward's inputs and output. Everything must stay valid until the job is waited for.
struct ForwardArgs {
  const void* input = nullptr;  // [tokens, H]
  DType input_dtype = DType::F32;
  int tokens = 0;
  const void* topk_ids = nullptr;  // [tokens, k], int32 or int64; -1 = skip
  bool ids_are_int64 = false;
  int topk = 0;
  const void* topk_weights = nullptr;  // [tokens, k]
  DType weights_dtype = DType::F32;
  void* output = nullptr;  // [tokens, H]
  DType output_dtype = DType::F32;
};

// Per-expert biases (gpt-oss): gate and up sums get gate_up's before the activation, and each
// expert's output gets down's before it is weighted. fp32, either may be null.
struct ExpertBiases {
  const float* gate_up = nullptr;  // [E, 2I]: gate's I values, then up's
  const float* down = nullptr;     // [E, H]
};

// Node n's rows [begin, begin + length) of every expert's intermediate dimension, in
// `panels` panels: whole panels and whole stored groups, so no panel straddles two nodes'
// memory and every group lies within one node.
struct IntermediateRows {
  int begin = 0, length = 0, panels = 0;
};
std::vector<IntermediateRows> split_intermediate(const ExpertShape& shape, int nodes);

// Bytes an engine of `shape` over `nodes` NUMA nodes holds (its weight_bytes()), known
// before any is allocated.
std::size_t planned_weight_bytes(const ExpertShape& shape, int nodes);

class MoEEngine {
 public:
  // w13: [E, 2I, H] (gate rows, then up rows); w2: [E, H, I]. They are converted into
  // shape.format (exactly when it is their own format) and copied; the caller may free them
  // afterwards. Throws std::invalid_argument for a conversion the engine does not make.
  MoEEngine(std::shared_ptr<Runtime> runtime, const WeightSource& w13, const WeightSource& w2,
            const ExpertShape& shape, const ExpertBiases& biases = {});

  // Checks the arguments (throws std::invalid_argument / std::out_of_range), waits for the
  // runtime's previous job, prepares routing and starts the job. Returns its ticket.
  uint32_t submit(const ForwardArgs& args);
  void wait(uint32_t ticket) { runtime_->executor().wait(ticket); }
  // Forwards submitted so far (tests read it to prove the engine computed a layer).
  uint64_t forward_calls() const { return forward_calls_.load(std::memory_order_relaxed); }

  const ExpertShape& shape() const { return shape_; }
  std::size_t weight_bytes() const;

  // Where node n's packed weights lie, for copying them elsewhere as they are (the GPU
  // prefill path streams these bytes and unpacks them on the device).
  struct PackedSlice {
    int begin, length, panels;  // rows [begin, begin + length) of I, in `panels` panels
    const HostBuffer& gate_up;  // [E][gate|up][panels] panels of depth H
    const HostBuffer& down;     // [E][hidden_panels] panels of depth `length`
    std::size_t gate_up_panel_bytes, down_panel_bytes;
  };
  std::vector<PackedSlice> packed_slices() const;
  int hidden_panels() const { return hidden_panels_; }

 private:
  struct NodeSlice : IntermediateRows {
    HostBuffer gate_up;  // [E][gate|up][panels] panels of depth H
    HostBuffer down;     // [E][hidden_panels] panels of depth `length`
  };

  // One forward's routing and task layout, worked out before the job starts and read by its
  // tasks. Kept from call to call, so a forward allocates only where it outgrows the last.
  struct ForwardPlan {
    ForwardArgs args;
    const kernels::FormatKernels* kernels = nullptr;  // shape.format's
    const float* input_rows = nullptr;  // fp32 rows as the kernels read them
    bool convert_input = false;         // input_rows is Runtime::Scratch::input
    bool integer_rows = false;          // the kernels read quantized rows
    bool unit_in_use = false;           // some chunk goes to the unit kernels
    uint32_t token_blocks = 0;          // of kTokenBlock tokens: input and combine tasks
    int node_threads = 0;
    std::size_t worker_floats = 0;  // each worker's share of Scratch::per_worker
    // Slot s is one (token, expert) pair; slots are grouped by expert, tokens ascending.
    std::vector<int32_t> active_experts;  // experts with at least one token, ascending
    std::vector<int32_t> expert_slots;    // slot range of active expert i: [i], [i + 1]
    std::vector<int32_t> slot_token;
    std::vector<float> slot_weight;       // routing weight times the activation scale
    std::vector<uint32_t> first_chunk;    // active expert i's first chunk of chunk_rows slots
    std::vector<std::size_t> down_chunk_bytes;    // per node: one chunk of hidden rows staged
    std::vector<std::size_t> groups_done_offset;  // per node: where its counters start
    std::vector<uint32_t> group_panels_done;      // per node, active expert, hidden group
    std::vector<uint32_t> gate_up_tasks;          // per node
    int down_run = 0;         // output panels per down task
    uint32_t down_tasks = 0;  // per node
    // Routing's working space: ids and weights per (token, k), repeats merged; per expert.
    std::vector<int32_t> ids, expert_tokens, next_slot;
    std::vector<float> weights;
  };

  void pack(const WeightSource& w13, const WeightSource& w2);
  std::size_t gate_up_panel_bytes() const;  // every node's: gate/up panels span the whole hidden depth
  std::size_t down_panel_bytes(const NodeSlice& slice) const;

  // Before the job (moe_forward.cpp): routing, then the plan and the scratch it needs.
  void read_routing(const ForwardArgs& args);
  void assign_slots(int tokens, int topk);
  void plan_forward(const ForwardArgs& args);
  void plan_node_scratch();
  int gate_up_run(int panels) const;
  // The job's phases, one task each: input rows, gate/up with activation, down rows staged
  // for the unit, down, and the nodes' outputs summed.
  void prepare_input(int node, uint32_t task);
  void gate_up(int node, uint32_t task, int worker);
  void quantize_finished_groups(int node, uint32_t expert_index, int first_panel, int end_panel);
  void stage_down(int node, uint32_t chunk);
  void down(int node, uint32_t task, int worker);
  void add_gate_up_bias(int expert, int first_row, int valid, int count, float* gate_sums, float* up_sums) const;
  void combine(int node, uint32_t task);
  float down_bias(std::size_t token, std::size_t h) const;
  kernels::ActivationRow down_row(int node, std::size_t slot) const;

  std::shared_ptr<Runtime> runtime_;
  ExpertShape shape_;
  int hidden_panels_;
  int hidden_stride_;  // hidden_panels_ * kPanelWidth
  std::vector<NodeSlice> slices_;
  QuantizedRows input_q_;               // the input's records for integer kernels
  std::vector<QuantizedRows> hidden_q_;  // per node: the hidden rows' records
  ForwardPlan plan_;
  std::atomic<uint64_t> forward_calls_{0};
  std::vector<float> gate_up_bias_, down_bias_;  // ExpertBiases' copies; empty where none
};

}  // namespace lk
