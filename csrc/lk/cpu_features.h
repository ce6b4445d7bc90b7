// What the running CPU (and OS) can execute; kernels are chosen from this at run time.
#pragma once

#include <string>

namespace lk {

// Ordered: each level implies the ones before it.
enum class Isa : int { Generic = 0, Avx2 = 1, Avx512 = 2, Avx512Vnni = 3, Avx512Bf16 = 4, Amx = 5 };

// Every level in order, for callers that list or parse them.
inline constexpr Isa kIsaLevels[] = {Isa::Generic, Isa::Avx2, Isa::Avx512, Isa::Avx512Vnni, Isa::Avx512Bf16, Isa::Amx};

const char* isa_name(Isa isa);
// Parses a level's isa_name; throws std::invalid_argument naming the valid ones otherwise.
Isa parse_isa(const std::string& name);
// Best level this CPU and OS support (AVX state enabled in XCR0, AMX tiles permitted).
Isa detect_best_isa();

}  // namespace lk
