// What the running CPU (and OS) can execute; kernels are chosen from this at run time.
#pragma once

#include <string>

namespace lk {

// Ordered: each level implies the ones before it.
enum class Isa : int { Generic = 0, Avx2 = 1, Avx512 = 2, Amx = 3 };

const char* isa_name(Isa isa);
// Parses "GENERIC", "AVX2", "AVX512", "AMX"; throws std::invalid_argument otherwise.
Isa parse_isa(const std::string& name);
// Best level this CPU and OS support (AVX state enabled in XCR0, AMX tiles permitted).
Isa detect_best_isa();

}  // namespace lk
