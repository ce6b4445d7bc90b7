// The few CUDA driver entry points lk needs, looked up in the driver library at run time:
// one build of lk serves machines with and without CUDA, and building needs no toolkit.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace lk::cuda {

using Stream = void*;               // CUstream (a cudaStream_t is the same handle)
using DevicePointer = std::uint64_t;  // CUdeviceptr
using HostFunction = void (*)(void* data);

class Driver {
 public:
  // Opens `library` (normally libcuda.so.1, which ships with the NVIDIA driver); throws
  // std::runtime_error naming the library or the missing symbol.
  explicit Driver(const std::string& library);
  ~Driver();
  Driver(const Driver&) = delete;
  Driver& operator=(const Driver&) = delete;

  // Queued on `stream`, in its order; the calling thread needs a current context (torch
  // has made one current on any thread that ran CUDA work). Throw std::runtime_error.
  void copy_to_host(void* destination, DevicePointer source, std::size_t bytes, Stream stream) const;
  void copy_to_device(DevicePointer destination, const void* source, std::size_t bytes, Stream stream) const;
  // `function` runs on a driver thread once the work queued before it is done; work queued
  // after it waits until it returns. It must not call CUDA.
  void launch_host_function(Stream stream, HostFunction function, void* data) const;

  const std::string& library() const { return library_; }

 private:
  using Result = int;  // CUresult
  void check(Result result, const char* call) const;

  std::string library_;
  void* handle_ = nullptr;
  Result (*copy_to_host_)(void*, DevicePointer, std::size_t, Stream) = nullptr;
  Result (*copy_to_device_)(DevicePointer, const void*, std::size_t, Stream) = nullptr;
  Result (*launch_host_function_)(Stream, HostFunction, void*) = nullptr;
  Result (*error_string_)(Result, const char**) = nullptr;
};

}  // namespace lk::cuda
