#include "lk/kernels/x86/avx512/simd.h"

namespace lk::kernels {

const FormatKernels avx512_f32 = PanelKernels<Avx512Simd, F32Unpack<Avx512Simd>>::table();

}  // namespace lk::kernels
