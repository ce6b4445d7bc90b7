#include "lk/kernels/x86/avx2/e2m1_unpack.h"

namespace lk::kernels {

// Widened from MXFP4's row count on.
const FormatKernels avx2_nvfp4 = PanelKernels<Avx2Simd, E2m1Unpack<WeightFormat::Nvfp4>>::table<
    E2m1WideUnpack<WeightFormat::Nvfp4>>(7);

}  // namespace lk::kernels
