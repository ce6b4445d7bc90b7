#include "lk/kernels/generic/scalar_simd.h"

namespace lk::kernels {
namespace {
using Loader = ScaledLoader<ScalarSimd, WeightFormat::Fp8E4M3, ScalarDecode<uint8_t, fp8_e4m3_to_float>>;
}  // namespace

const FormatKernels generic_fp8 = PanelKernels<ScalarSimd, Loader>::table();

}  // namespace lk::kernels
