// What a panel kernel costs in arithmetic alone: one core multiplying activation rows by a
// panel that stays in cache, so kernel changes can be compared without the memory noise
// that dominates whole-layer timings on a shared machine.
#pragma once

#include <cstddef>
#include <string>

namespace lk::bench {

// Nanoseconds the calling thread spends per panel row (kPanelWidth weights) in the panel
// kernels of `isa` ("GENERIC", "AVX2", ...) for weight `format` (format_name: "bfloat16",
// "int8", ...) multiplying `rows` activation rows by a random panel `depth` inputs deep
// (quantization group 128) as the engine does (kernels::multiply_panel: widening where
// prefill does). `pair`: through gemm_pair, two panels side by side, counted
// per panel. Best of 15 timings of about `seconds` / 15 each. Throws std::invalid_argument for
// an ISA the CPU lacks, an unknown format, rows outside 1..64 or above pair_rows with `pair`.
double kernel_ns_per_panel_row(const std::string& isa, const std::string& format, int rows, int depth, bool pair,
                               double seconds);

// Bytes of one such panel, values plus scales (and INT4 offsets), as the engine stores it.
std::size_t kernel_panel_bytes(const std::string& format, int depth);

// Most rows the kernel of `isa` for `format` reads two panels side by side for (0: none).
int kernel_pair_rows(const std::string& isa, const std::string& format);

}  // namespace lk::bench
