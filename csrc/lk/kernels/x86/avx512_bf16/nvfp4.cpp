#include "lk/kernels/x86/avx512/integer_unpack.h"
#include "lk/kernels/x86/avx512_vnni/simd.h"

namespace lk::kernels {

// As MXFP4's at this level (mxfp4.cpp).
const FormatKernels avx512_bf16_nvfp4 = PanelKernels<Avx512VnniSimd, Nvfp4Unpack>::table();

}  // namespace lk::kernels
