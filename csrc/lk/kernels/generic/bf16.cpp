#include "lk/kernels/generic/scalar_simd.h"

namespace lk::kernels {
namespace {
using Unpack = ScalarUnpack<WeightFormat::BF16, uint16_t, bf16_to_float>;
}  // namespace

// Two rows per pass: converting in every pass adds up, so prefill widens to fp32 once.
const FormatKernels generic_bf16 = PanelKernels<ScalarSimd, Unpack>::table<F32Unpack<ScalarSimd, Unpack>>();

}  // namespace lk::kernels
