#include "lk/kernels/generic/scalar_simd.h"

namespace lk::kernels {
namespace {
using Decode = ScalarDecode<WeightFormat::BF16, uint16_t, bf16_to_float>;
}  // namespace

const FormatKernels generic_bf16 = PanelKernels<ScalarSimd, Decode>::table();

}  // namespace lk::kernels
