#include "lk/kernels/generic/scalar_simd.h"

namespace lk::kernels {
namespace {
float identity(float value) { return value; }
using Loader = PlainLoader<ScalarSimd, ScalarDecode<float, identity>>;
}  // namespace

const FormatKernels generic_f32 = PanelKernels<ScalarSimd, Loader>::table();

}  // namespace lk::kernels
