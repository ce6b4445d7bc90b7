#include "lk/kernels/x86/avx512/integer_unpack.h"
#include "lk/kernels/x86/avx512_vnni/simd.h"

namespace lk::kernels {

// vpdpbusd multiplies the looked-up bytes as INT4's, into 32-bit sums.
const FormatKernels avx512_vnni_mxfp4 = PanelKernels<Avx512VnniSimd, Mxfp4Unpack>::table();

}  // namespace lk::kernels
