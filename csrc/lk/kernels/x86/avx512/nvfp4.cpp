#include "lk/kernels/x86/avx512/integer_unpack.h"
#include "lk/kernels/x86/avx512/simd.h"

namespace lk::kernels {

const FormatKernels avx512_nvfp4 = PanelKernels<Avx512Simd, Nvfp4Unpack>::table();

}  // namespace lk::kernels
