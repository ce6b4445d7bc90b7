#include "lk/kernels/generic/scalar_simd.h"

namespace lk::kernels {
namespace {
using Decode = ScalarDecode<WeightFormat::BF16, uint16_t, bf16_to_float>;
}  // namespace

// Two rows per pass: converting in every pass adds up, so prefill widens to fp32 once.
const FormatKernels generic_bf16 = PanelKernels<ScalarSimd, Decode>::table<F32Decode<ScalarSimd, Decode>>();

}  // namespace lk::kernels
