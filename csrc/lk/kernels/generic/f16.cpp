#include "lk/kernels/generic/scalar_simd.h"

namespace lk::kernels {
namespace {
using Loader = PlainLoader<ScalarSimd, ScalarDecode<uint16_t, f16_to_float>>;
}  // namespace

const FormatKernels generic_f16 = PanelKernels<ScalarSimd, Loader>::table();

}  // namespace lk::kernels
