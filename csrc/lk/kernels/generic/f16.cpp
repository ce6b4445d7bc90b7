#include "lk/kernels/generic/scalar_simd.h"

namespace lk::kernels {
namespace {
using Decode = ScalarDecode<WeightFormat::F16, uint16_t, f16_to_float>;
}  // namespace

const FormatKernels generic_f16 = PanelKernels<ScalarSimd, Decode>::table();

}  // namespace lk::kernels
