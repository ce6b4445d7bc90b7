#include "lk/kernels/generic/scalar_simd.h"

namespace lk::kernels {

const FormatKernels generic_f32 = PanelKernels<ScalarSimd, F32Unpack<ScalarSimd>>::table();

}  // namespace lk::kernels
