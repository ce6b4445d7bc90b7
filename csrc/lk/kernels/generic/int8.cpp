#include "lk/kernels/generic/scalar_simd.h"

namespace lk::kernels {
namespace {
struct Unpack {
  static constexpr WeightFormat kFormat = WeightFormat::Int8;
  static void pairs(const uint8_t* block, int32_t (&w)[1][kPanelWidth]) {
    for (int j = 0; j < kPanelWidth; ++j) {
      w[0][j] = ScalarSimd::pack(static_cast<int8_t>(block[2 * j]), static_cast<int8_t>(block[2 * j + 1]));
    }
  }
};
}  // namespace

// Prefill widens a block to its row pairs once.
const FormatKernels generic_int8 = PanelKernels<ScalarSimd, Unpack>::table<Int16PairUnpack<WeightFormat::Int8>>();

}  // namespace lk::kernels
