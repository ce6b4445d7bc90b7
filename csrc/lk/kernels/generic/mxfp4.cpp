#include "lk/kernels/generic/scalar_simd.h"

namespace lk::kernels {

// Prefill widens a block to its row pairs once, as INT4 does.
const FormatKernels generic_mxfp4 =
    PanelKernels<ScalarSimd, E2m1BlockUnpack<WeightFormat::Mxfp4>>::table<Int16PairUnpack<WeightFormat::Mxfp4>>();

}  // namespace lk::kernels
