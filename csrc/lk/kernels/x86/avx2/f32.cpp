#include "lk/kernels/x86/avx2/simd.h"

namespace lk::kernels {

const FormatKernels avx2_f32 = PanelKernels<Avx2Simd, F32Unpack<Avx2Simd>>::table();

}  // namespace lk::kernels
