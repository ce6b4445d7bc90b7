// One dense linear layer, out = x · Wᵀ (+ bias), on the engine's kernels and executor: the
// host's own dense kernels are slow where it has none for the weights' type (vLLM's CPU
// build on AVX2 falls back to torch's bf16 matmul), and read every weight in float where
// INT8 or INT4 would read a half or a quarter of the bytes. Node n holds a contiguous range
// of the output panels, so each node reads only its own memory and writes its own columns.
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

// One forward's inputs and output. Everything must stay valid until the job is waited for.
struct LinearArgs {
  const void* input = nullptr;  // [rows, inputs]
  DType input_dtype = DType::F32;
  int rows = 0;
  const void* bias = nullptr;  // [outputs] or null
  DType bias_dtype = DType::F32;
  void* output = nullptr;  // [rows, outputs]
  DType output_dtype = DType::F32;
};

class LinearEngine {
 public:
  // weight: [outputs, inputs] in a float format (float32, float16, bfloat16), copied into
  // `format`: the weight's own, or INT8 / INT4 quantized in groups of `group` inputs (a
  // positive multiple of 16; ignored for float formats). The caller may free it afterwards.
  LinearEngine(std::shared_ptr<Runtime> runtime, const WeightSource& weight, int outputs, int inputs,
               WeightFormat format, int group);

  // Checks the arguments (throws std::invalid_argument), waits for the runtime's previous
  // job and starts this one. Returns its ticket.
  uint32_t submit(const LinearArgs& args);
  void wait(uint32_t ticket) { runtime_->executor().wait(ticket); }
  // Forwards submitted so far (tests read it to prove the engine computed a layer).
  uint64_t forward_calls() const { return forward_calls_.load(std::memory_order_relaxed); }

  int outputs() const { return outputs_; }
  int inputs() const { return inputs_; }
  WeightFormat format() const { return format_; }
  int group() const { return group_; }
  std::size_t weight_bytes() const;

  // Bytes a layer of this shape and format holds, before it exists (the same on any nodes).
  static std::size_t planned_bytes(int outputs, int inputs, WeightFormat format, int group);

 private:
  struct NodePanels {
    int first = 0, count = 0;  // output panels [first, first + count)
    HostBuffer panels;
  };

  // One forward's layout, worked out before the job starts and read by its tasks; kept from
  // call to call, so a forward allocates only where it outgrows the last.
  struct ForwardPlan {
    LinearArgs args;
    const float* input_rows = nullptr;  // fp32 rows as the kernels read them
    bool convert_input = false;         // input_rows is Runtime::Scratch::input
    bool integer_rows = false;          // the kernels also read Runtime::Scratch::input_q
    uint32_t row_blocks = 0;            // kTokenBlock rows per conversion task
    uint32_t row_chunks = 0;            // chunk_rows rows per multiply task
    std::size_t sum_floats = 0;         // one panel's sums for chunk_rows rows
    std::size_t worker_floats = 0;      // each worker's share of Scratch::per_worker
    std::vector<int> run;               // per node: panels per multiply task
    std::vector<uint32_t> multiply_tasks;  // per node
  };

  void pack(const WeightSource& weight);
  void plan_forward(const LinearArgs& args);
  // The job's phases, one task each.
  void prepare_input(int node, uint32_t task);
  void multiply(int node, uint32_t task, int worker);

  std::shared_ptr<Runtime> runtime_;
  int outputs_, inputs_;
  WeightFormat format_;
  int group_;
  QuantizedRows input_q_;  // the input's records for integer kernels
  std::size_t panel_bytes_;
  std::vector<NodePanels> nodes_;
  ForwardPlan plan_;
  std::atomic<uint64_t> forward_calls_{0};
};

}  // namespace lk
