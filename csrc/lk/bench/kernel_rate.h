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
// prefill does, unit kernels where they take the rows, with the rows staged once and the
// staging not timed). `pair`: two panels side by side (kernels::multiply_two_panels),
// counted per panel. Best of 15 timings of about `seconds` / 15 each. Throws
// std::invalid_argument for an ISA the CPU lacks, an unknown format, rows outside
// 1..kernel_chunk_rows(isa, format), or `pair` for rows the kernels do not read two panels
// side by side for. `bf16_inputs`: activations that bf16 holds exactly, as a bf16 model's
// inputs to gate and up are (the float unit kernels then multiply one bf16 plane, not two).
double kernel_ns_per_panel_row(const std::string& isa, const std::string& format, int rows, int depth, bool pair,
                               double seconds, bool bf16_inputs);

// Bytes of one such panel, values plus scales (and INT4 offsets), as the engine stores it.
std::size_t kernel_panel_bytes(const std::string& format, int depth);

// Most rows the engine hands the kernels of `isa` for `format` in one call (its chunk).
int kernel_chunk_rows(const std::string& isa, const std::string& format);

// Whether the kernels of `isa` for `format` read two panels side by side for `rows` rows
// (the pair kernel of decode, or the unit kernels).
bool kernel_reads_two_panels(const std::string& isa, const std::string& format, int rows);

}  // namespace lk::bench
