#include "lk/kernels/x86/avx512/integer_unpack.h"
#include "lk/kernels/x86/avx512/simd.h"

namespace lk::kernels {

const FormatKernels avx512_int8 = PanelKernels<Avx512Simd, Int8Unpack>::table();

}  // namespace lk::kernels
