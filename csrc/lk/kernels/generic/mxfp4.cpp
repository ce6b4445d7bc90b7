#include "lk/kernels/generic/scalar_simd.h"

namespace lk::kernels {
namespace {
// Each nibble an e2m1 code: twice its value, signed (INT4's generic unpacking, without its offset).
int doubled(int code) { return kMxfp4Doubled[code]; }

struct Unpack : NibbleBlockUnpack<doubled> {
  static constexpr WeightFormat kFormat = WeightFormat::Mxfp4;
};
}  // namespace

// Prefill widens a block to its row pairs once, as INT4 does.
const FormatKernels generic_mxfp4 = PanelKernels<ScalarSimd, Unpack>::table<Int16PairUnpack<WeightFormat::Mxfp4>>();

}  // namespace lk::kernels
