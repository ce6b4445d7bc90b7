#include "lk/kernels/generic/scalar_simd.h"

namespace lk::kernels {
namespace {
// The word order of formats.h: word 2c + q holds columns c and c + 8 of rows q and q + 2,
// each as a signed nibble.
int signed_nibble(int nibble) { return (nibble ^ 8) - 8; }

struct Unpack : NibbleBlockUnpack<signed_nibble> {
  static constexpr WeightFormat kFormat = WeightFormat::Int4;
};
}  // namespace

// Prefill widens a block to its row pairs once.
const FormatKernels generic_int4 = PanelKernels<ScalarSimd, Unpack>::table<Int16PairUnpack<WeightFormat::Int4>>();

}  // namespace lk::kernels
