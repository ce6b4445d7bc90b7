#include "lk/kernels/generic/scalar_simd.h"

namespace lk::kernels {
namespace {
float int8_value(int8_t value) { return static_cast<float>(value); }
using Loader = ScaledLoader<ScalarSimd, WeightFormat::Int8, ScalarDecode<int8_t, int8_value>>;
}  // namespace

const FormatKernels generic_int8 = PanelKernels<ScalarSimd, Loader>::table();

}  // namespace lk::kernels
