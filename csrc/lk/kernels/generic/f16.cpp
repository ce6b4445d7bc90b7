#include "lk/kernels/generic/scalar_simd.h"

namespace lk::kernels {
namespace {
using Unpack = ScalarUnpack<WeightFormat::F16, uint16_t, f16_to_float>;
}  // namespace

// Prefill widens to fp32 once, as bf16 does.
const FormatKernels generic_f16 = PanelKernels<ScalarSimd, Unpack>::table<F32Unpack<ScalarSimd, Unpack>>();

}  // namespace lk::kernels
