#include "lk/kernels/x86/avx512/integer_decode.h"
#include "lk/kernels/x86/avx512/simd.h"

namespace lk::kernels {

const FormatKernels avx512_mxfp4 = PanelKernels<Avx512Simd, Mxfp4Decode>::table();

}  // namespace lk::kernels
