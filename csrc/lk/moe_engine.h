// One MoE layer's routed experts, in the engine's own layout, split across NUMA nodes:
// node n holds rows [begin_n, end_n) of every expert's intermediate dimension (its gate,
// up and the matching columns of down), so every node works on every expert and reads only
// its own memory; the nodes' partial outputs are summed at the end.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

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
            const ExpertShape& shape);

  // Checks the arguments (throws std::invalid_argument / std::out_of_range), waits for the
  // runtime's previous job, prepares routing and starts the job. Returns its ticket.
  uint32_t submit(const ForwardArgs& args);
  void wait(uint32_t ticket) { runtime_->executor().wait(ticket); }

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

  void pack(const WeightSource& w13, const WeightSource& w2);
  std::size_t gate_up_panel_bytes(const NodeSlice& slice) const;
  std::size_t down_panel_bytes(const NodeSlice& slice) const;
  void route(const ForwardArgs& args);

  std::shared_ptr<Runtime> runtime_;
  ExpertShape shape_;
  int hidden_panels_;
  int hidden_stride_;  // hidden_panels_ * kPanelWidth
  std::vector<NodeSlice> slices_;
};

}  // namespace lk
