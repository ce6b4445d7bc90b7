#include "lk/kernels/generic/scalar_simd.h"

namespace lk::kernels {
namespace {
float identity(float value) { return value; }
}  // namespace

const FormatKernels generic_f32 = PanelKernels<ScalarSimd, ScalarLoader<float, identity>>::table();

}  // namespace lk::kernels
