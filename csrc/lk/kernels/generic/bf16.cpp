#include "lk/kernels/generic/scalar_simd.h"

namespace lk::kernels {

const FormatKernels generic_bf16 =
    PanelKernels<ScalarSimd, ScalarLoader<uint16_t, bf16_to_float>>::table();

}  // namespace lk::kernels
