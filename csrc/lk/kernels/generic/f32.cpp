#include "lk/kernels/generic/scalar_simd.h"

namespace lk::kernels {
namespace {
float identity(float value) { return value; }
using Decode = ScalarDecode<WeightFormat::F32, float, identity>;
}  // namespace

const FormatKernels generic_f32 = PanelKernels<ScalarSimd, Decode>::table();

}  // namespace lk::kernels
