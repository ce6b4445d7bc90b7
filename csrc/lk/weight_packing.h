// Caller weights into the engine's panels (formats.h): shared by the MoE and linear
// engines.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

#include "lk/formats.h"
#include "lk/runtime.h"

namespace lk {

// Weights as the caller has them: [E, rows, cols] values, row-major. Float formats stand
// alone; grouped formats come with fp32 scales (and INT4 offsets) of shape
// [E, rows, ceil(cols / group)], value = q * scale (+ offset). INT4 values are one byte
// each (0..15), INT8 values int8, FP8 values float8 e4m3fn bytes. MXFP4 comes as its
// checkpoints hold it (formats.h): two e2m1 codes per byte, the even input's in the low
// nibble, [E, rows, cols / 2] bytes, and e8m0 scale bytes [E, rows, cols / 32] in
// `scale_bytes` (cols a multiple of 32, group 32). NVFP4 likewise, with e4m3fn scale bytes
// [E, rows, cols / 16] (group 16) and float32 `row_scales` [E, rows].
struct WeightSource {
  const void* values = nullptr;
  WeightFormat format = WeightFormat::BF16;
  const float* scales = nullptr;
  const float* offsets = nullptr;
  int group = 0;
  const uint8_t* scale_bytes = nullptr;
  const float* row_scales = nullptr;
};

// Throws std::invalid_argument, naming `name`, where `source` cannot be read.
void check_source(const WeightSource& source, const char* name);

// One expert's source matrix, read a row segment at a time.
struct SourceMatrix {
  const WeightSource& source;
  std::size_t rows, cols;
  std::size_t expert;

  std::size_t groups() const { return (cols + source.group - 1) / source.group; }
  std::size_t meta_index(std::size_t row, std::size_t col) const {
    return (expert * rows + row) * groups() + col / source.group;
  }
  const uint8_t* row_bytes(std::size_t row, std::size_t element_bytes) const {
    return static_cast<const uint8_t*>(source.values) + (expert * rows + row) * cols * element_bytes;
  }

  // MXFP4 and NVFP4: the bytes holding `row`'s codes, two per byte.
  const uint8_t* code_bytes(std::size_t row) const {
    return static_cast<const uint8_t*>(source.values) + (expert * rows + row) * (cols / 2);
  }

  // Throws std::invalid_argument where inputs [first_col, first_col + depth) of `row` hold
  // an e4m3fn NaN, which means a damaged checkpoint.
  void check_fp8(std::size_t row, std::size_t first_col, int depth) const;
  // The scale byte (MXFP4's e8m0, NVFP4's e4m3) of `row`'s group holding input `col`;
  // throws std::invalid_argument for a NaN scale, as check_fp8 does, and for inputs not in
  // whole groups.
  uint8_t scale_byte(std::size_t row, std::size_t col) const;
  // NVFP4's row scale of `row`; throws std::invalid_argument where it is not finite or not below
  // kNvfp4RowScaleLimit in magnitude (formats.h).
  float row_scale(std::size_t row) const;
  // Inputs [first_col, first_col + depth) of `row` as floats, dequantized where needed.
  void read_floats(std::size_t row, std::size_t first_col, int depth, float* out) const;
};

// What packing one panel needs besides the panel: a source row as floats, and the panel's
// columns as stored integer codes, [kPanelWidth][depth rounded up to a block].
struct PackScratch {
  std::vector<float> floats;
  std::vector<uint8_t> codes;
  std::vector<uint8_t> zeros;
};

// Writes one panel: columns j < kPanelWidth are source rows rows[j] (-1: zero padding),
// inputs k are source columns first_col + k. Same formats (and groups) copy exactly;
// otherwise values are read as floats and stored or quantized per group.
void pack_panel(const SourceMatrix& source, const int (&rows)[kPanelWidth], std::size_t first_col, int depth,
                WeightFormat format, int group, PackScratch& scratch, uint8_t* panel);

// Runs pack(node, task) for every task as one job on the runtime's workers, each node's
// tasks first on that node's workers so that first touch places their pages there.
// Rethrows the first exception a task threw as std::invalid_argument.
void pack_on_workers(Runtime& runtime, std::vector<uint32_t> tasks_per_node,
                     const std::function<void(int node, uint32_t task)>& pack);

}  // namespace lk
