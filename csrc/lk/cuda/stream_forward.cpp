#include "lk/cuda/stream_forward.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

namespace lk::cuda {

namespace {

void require(bool condition, const std::string& message) {
  if (!condition) throw std::invalid_argument(message);
}

std::size_t element_bytes(DType type) { return type == DType::F32 ? 4 : 2; }

}  // namespace

StreamedForwards::Call& StreamedForwards::new_record(bool replayable) {
  if (!replayable) {
    for (auto& call : eager_) {
      if (call->done.load(std::memory_order_acquire)) {
        call->done.store(false, std::memory_order_relaxed);
        return *call;
      }
    }
  }
  auto& records = replayable ? replayable_ : eager_;
  records.push_back(std::make_unique<Call>());
  return *records.back();
}

std::uintptr_t StreamedForwards::begin(Stream stream, MoEEngine& engine, const DeviceForward& forward,
                                       const HostStaging& staging, bool replayable) {
  const std::size_t tokens = static_cast<std::size_t>(std::max(forward.tokens, 0));
  const std::size_t row_bytes = static_cast<std::size_t>(engine.shape().hidden) * element_bytes(forward.input_dtype);
  const std::size_t io_bytes = tokens * row_bytes;
  const std::size_t topk_bytes = tokens * static_cast<std::size_t>(std::max(forward.topk, 0)) * 4;
  require(forward.tokens >= 0 && forward.topk >= 1, "streamed forward: tokens must be >= 0 and top-k >= 1");
  require(io_bytes <= staging.input_bytes && io_bytes <= staging.output_bytes && topk_bytes <= staging.topk_bytes &&
              (forward.padding == 0 || tokens <= staging.padding_bytes),
          "streamed forward: " + std::to_string(tokens) + " tokens do not fit the pinned staging buffers");

  Call& call = new_record(replayable);
  call.owner = this;
  call.engine = &engine;
  call.args = ForwardArgs{};
  call.args.input = staging.input;
  call.args.input_dtype = forward.input_dtype;
  call.args.tokens = forward.tokens;
  call.args.topk_ids = staging.topk_ids;
  call.args.topk = forward.topk;
  call.args.topk_weights = staging.topk_weights;
  call.args.weights_dtype = DType::F32;
  call.args.output = staging.output;
  call.args.output_dtype = forward.input_dtype;
  call.host_ids = staging.topk_ids;
  call.host_padding = forward.padding != 0 ? staging.padding : nullptr;
  call.output_bytes = io_bytes;
  call.running = false;

  if (tokens > 0) {
    driver_->copy_to_host(staging.input, forward.input, io_bytes, stream);
    driver_->copy_to_host(staging.topk_ids, forward.topk_ids, topk_bytes, stream);
    driver_->copy_to_host(staging.topk_weights, forward.topk_weights, topk_bytes, stream);
    if (forward.padding != 0) driver_->copy_to_host(staging.padding, forward.padding, tokens, stream);
  }
  driver_->launch_host_function(stream, &StreamedForwards::start_on_host, &call);
  return reinterpret_cast<std::uintptr_t>(&call);
}

void StreamedForwards::finish(Stream stream, std::uintptr_t handle, DevicePointer output) {
  Call& call = *reinterpret_cast<Call*>(handle);
  driver_->launch_host_function(stream, &StreamedForwards::wait_on_host, &call);
  if (call.output_bytes > 0) driver_->copy_to_device(output, call.args.output, call.output_bytes, stream);
}

void StreamedForwards::start_on_host(void* data) {
  Call& call = *static_cast<Call*>(data);
  call.running = false;
  try {
    if (call.host_padding != nullptr) {
      for (int t = 0; t < call.args.tokens; ++t) {
        if (call.host_padding[t] != 0) std::fill_n(call.host_ids + static_cast<std::size_t>(t) * call.args.topk, call.args.topk, -1);
      }
    }
    call.ticket = call.engine->submit(call.args);
    call.running = true;
  } catch (const std::exception& error) {
    std::memset(call.args.output, 0, call.output_bytes);
    call.owner->report(error.what());
  }
}

void StreamedForwards::wait_on_host(void* data) {
  Call& call = *static_cast<Call*>(data);
  if (call.running) {
    call.engine->wait(call.ticket);
    call.running = false;
  }
  call.done.store(true, std::memory_order_release);
}

void StreamedForwards::report(const std::string& error) {
  std::lock_guard<std::mutex> lock(error_mutex_);
  if (error_.empty()) error_ = error;
}

std::string StreamedForwards::take_error() {
  std::lock_guard<std::mutex> lock(error_mutex_);
  std::string error;
  error.swap(error_);
  return error;
}

}  // namespace lk::cuda
