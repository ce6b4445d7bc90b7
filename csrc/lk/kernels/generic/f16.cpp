#include "lk/kernels/generic/scalar_simd.h"

namespace lk::kernels {

const FormatKernels generic_f16 =
    PanelKernels<ScalarSimd, ScalarLoader<uint16_t, f16_to_float>>::table();

}  // namespace lk::kernels
