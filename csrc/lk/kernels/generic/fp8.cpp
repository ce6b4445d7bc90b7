#include "lk/kernels/generic/scalar_simd.h"

namespace lk::kernels {
namespace {
using Unpack = ScalarUnpack<WeightFormat::Fp8E4M3, uint8_t, fp8_e4m3_to_float>;
}  // namespace

// Prefill widens to fp32 once, as bf16 does.
const FormatKernels generic_fp8 = PanelKernels<ScalarSimd, Unpack>::table<F32Unpack<ScalarSimd, Unpack>>();

}  // namespace lk::kernels
