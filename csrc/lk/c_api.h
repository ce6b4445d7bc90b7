// lk's entry points for another shared library in the process (lk's torch ops, csrc/lk_torch):
// a constant table of plain functions whose address the Python module hands over, so the
// module keeps its symbols hidden and no exception crosses from one library into the other.
#pragma once

#include <cstddef>
#include <cstdint>

#include "lk/linear_engine.h"
#include "lk/moe_engine.h"

namespace lk {

// Bumped whenever CApi or the argument structs change: a caller built against another
// version refuses the table.
constexpr uint32_t kCApiVersion = 1;

enum class CApiStatus : int { Ok = 0, InvalidArgument = 1, OutOfRange = 2, Failed = 3 };

struct CApi {
  uint32_t version;
  uint32_t size;  // sizeof(CApi)
  // Each runs one forward and waits for it; on failure the engine's message goes to `error`
  // (cut to error_size bytes, terminated).
  CApiStatus (*moe_forward)(MoEEngine* engine, const ForwardArgs* args, char* error, std::size_t error_size);
  CApiStatus (*linear_forward)(LinearEngine* engine, const LinearArgs* args, char* error,
                               std::size_t error_size);
};

const CApi& c_api();

}  // namespace lk
