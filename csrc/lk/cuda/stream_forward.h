// A MoE layer's routed experts computed in the order of a CUDA stream.
//
// begin() queues the copies of the hidden states and routing into pinned host memory and a
// host function that starts the lk job; finish() queues a host function that waits for the
// job and the copy of the result back. Nothing blocks the calling thread, so the device runs
// whatever is queued between the two (shared experts) while the CPU computes, and the whole
// sequence can be captured in a CUDA graph and replayed.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "lk/cuda/driver.h"
#include "lk/moe_engine.h"

namespace lk::cuda {

// Pinned host memory for one stream's forwards. All layers on a stream share it: the
// stream orders their uses.
struct HostStaging {
  void* input = nullptr;         // [tokens, H], the hidden states' dtype
  int32_t* topk_ids = nullptr;   // [tokens, k]
  float* topk_weights = nullptr;  // [tokens, k]
  uint8_t* padding = nullptr;    // [tokens], nonzero: a padding row
  void* output = nullptr;        // [tokens, H], the hidden states' dtype
  std::size_t input_bytes = 0, topk_bytes = 0, padding_bytes = 0, output_bytes = 0;
};

// One forward's device tensors (contiguous).
struct DeviceForward {
  DevicePointer input = 0;  // [tokens, H]
  DType input_dtype = DType::BF16;
  int tokens = 0;
  DevicePointer topk_ids = 0;      // [tokens, k] int32; -1 = skip
  DevicePointer topk_weights = 0;  // [tokens, k] float32
  int topk = 0;
  // [tokens] bool, true for rows that are padding (a graph captured for more tokens than
  // a replay carries): their experts are skipped and their output rows are zero. 0: none.
  DevicePointer padding = 0;
};

class StreamedForwards {
 public:
  explicit StreamedForwards(std::shared_ptr<const Driver> driver) : driver_(std::move(driver)) {}
  StreamedForwards(const StreamedForwards&) = delete;
  StreamedForwards& operator=(const StreamedForwards&) = delete;

  // Queues the copies in and the start of `engine`'s job; returns the handle finish() takes.
  // `replayable`: the stream is being captured, so what is queued here may run many times;
  // its record then lives as long as this object. Throws std::invalid_argument for
  // arguments that do not fit the engine or the staging.
  std::uintptr_t begin(Stream stream, MoEEngine& engine, const DeviceForward& forward,
                       const HostStaging& staging, bool replayable);
  // Queues the wait for the job and the copy of the result into `output` ([tokens, H]).
  void finish(Stream stream, std::uintptr_t handle, DevicePointer output);

  // The first error a host function met since the last call ("" if none), then clears it.
  // Host functions cannot throw into the stream: the affected rows come back as zeros.
  std::string take_error();

  std::size_t records() const { return eager_.size() + replayable_.size(); }

 private:
  struct Call {
    StreamedForwards* owner = nullptr;
    MoEEngine* engine = nullptr;
    ForwardArgs args;
    int32_t* host_ids = nullptr;
    const uint8_t* host_padding = nullptr;
    std::size_t output_bytes = 0;
    uint32_t ticket = 0;
    bool running = false;
    // Set by the waiting host function: an eager record may then be reused.
    std::atomic<bool> done{false};
  };

  static void start_on_host(void* data);
  static void wait_on_host(void* data);
  void report(const std::string& error);
  Call& new_record(bool replayable);

  std::shared_ptr<const Driver> driver_;
  std::vector<std::unique_ptr<Call>> eager_;
  std::vector<std::unique_ptr<Call>> replayable_;
  std::mutex error_mutex_;
  std::string error_;
};

}  // namespace lk::cuda
