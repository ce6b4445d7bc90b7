#include "lk/kernels/x86/avx2/e2m1_unpack.h"

namespace lk::kernels {

// Up to two passes (6 rows) unpack in each pass: widening first measured 4-6% slower there.
const FormatKernels avx2_mxfp4 = PanelKernels<Avx2Simd, E2m1Unpack<WeightFormat::Mxfp4>>::table<
    E2m1WideUnpack<WeightFormat::Mxfp4>>(7);

}  // namespace lk::kernels
