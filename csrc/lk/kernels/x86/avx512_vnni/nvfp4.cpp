#include "lk/kernels/x86/avx512/integer_unpack.h"
#include "lk/kernels/x86/avx512_vnni/simd.h"

namespace lk::kernels {

// vpdpbusd multiplies the looked-up bytes as MXFP4's.
const FormatKernels avx512_vnni_nvfp4 = PanelKernels<Avx512VnniSimd, Nvfp4Unpack>::table();

}  // namespace lk::kernels
