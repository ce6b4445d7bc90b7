#include "lk/c_api.h"

#include <cstring>
#include <exception>
#include <stdexcept>

namespace lk {
namespace {

void write_error(const char* message, char* error, std::size_t error_size) {
  if (error_size == 0) return;
  std::strncpy(error, message, error_size - 1);
  error[error_size - 1] = '\0';
}

template <class Engine, class Args>
CApiStatus run_forward(Engine* engine, const Args* args, char* error, std::size_t error_size) noexcept {
  try {
    engine->wait(engine->submit(*args));
    return CApiStatus::Ok;
  } catch (const std::invalid_argument& failure) {
    write_error(failure.what(), error, error_size);
    return CApiStatus::InvalidArgument;
  } catch (const std::out_of_range& failure) {
    write_error(failure.what(), error, error_size);
    return CApiStatus::OutOfRange;
  } catch (const std::exception& failure) {
    write_error(failure.what(), error, error_size);
    return CApiStatus::Failed;
  }
}

constexpr CApi kCApi{kCApiVersion, sizeof(CApi), &run_forward<MoEEngine, ForwardArgs>,
                     &run_forward<LinearEngine, LinearArgs>};

}  // namespace

const CApi& c_api() { return kCApi; }

}  // namespace lk
