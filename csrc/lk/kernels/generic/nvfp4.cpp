#include "lk/kernels/generic/scalar_simd.h"

namespace lk::kernels {
namespace {
// Each nibble an e2m1 code: twice its value, signed, as MXFP4's (the scales differ, not the values).
int doubled(int code) { return kMxfp4Doubled[code]; }

struct Unpack : NibbleBlockUnpack<doubled> {
  static constexpr WeightFormat kFormat = WeightFormat::Nvfp4;
};
}  // namespace

const FormatKernels generic_nvfp4 = PanelKernels<ScalarSimd, Unpack>::table<Int16PairUnpack<WeightFormat::Nvfp4>>();

}  // namespace lk::kernels
