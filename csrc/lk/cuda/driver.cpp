#include "lk/cuda/driver.h"

#include <dlfcn.h>

#include <stdexcept>

namespace lk::cuda {

namespace {

template <class Function>
void resolve(void* handle, const std::string& library, const char* name, Function& function) {
  function = reinterpret_cast<Function>(dlsym(handle, name));
  if (function == nullptr) throw std::runtime_error(library + " has no " + name + " (CUDA driver too old?)");
}

}  // namespace

Driver::Driver(const std::string& library) : library_(library) {
  handle_ = dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle_ == nullptr) {
    const char* reason = dlerror();
    throw std::runtime_error("cannot load the CUDA driver library " + library + ": " +
                             (reason != nullptr ? reason : "unknown reason"));
  }
  try {
    // The _v2 entry points take 64-bit device pointers; the unsuffixed ones are legacy.
    resolve(handle_, library_, "cuMemcpyDtoHAsync_v2", copy_to_host_);
    resolve(handle_, library_, "cuMemcpyHtoDAsync_v2", copy_to_device_);
    resolve(handle_, library_, "cuLaunchHostFunc", launch_host_function_);
    resolve(handle_, library_, "cuGetErrorString", error_string_);
  } catch (...) {
    dlclose(handle_);
    throw;
  }
}

Driver::~Driver() { dlclose(handle_); }

void Driver::check(Result result, const char* call) const {
  if (result == 0) return;
  const char* text = nullptr;
  error_string_(result, &text);
  throw std::runtime_error(std::string(call) + " failed: " + (text != nullptr ? text : "error ") +
                           " (" + std::to_string(result) + ")");
}

void Driver::copy_to_host(void* destination, DevicePointer source, std::size_t bytes, Stream stream) const {
  check(copy_to_host_(destination, source, bytes, stream), "cuMemcpyDtoHAsync");
}

void Driver::copy_to_device(DevicePointer destination, const void* source, std::size_t bytes, Stream stream) const {
  check(copy_to_device_(destination, source, bytes, stream), "cuMemcpyHtoDAsync");
}

void Driver::launch_host_function(Stream stream, HostFunction function, void* data) const {
  check(launch_host_function_(stream, function, data), "cuLaunchHostFunc");
}

}  // namespace lk::cuda
