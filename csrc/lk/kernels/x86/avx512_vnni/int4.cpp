#include "lk/kernels/x86/avx512/integer_unpack.h"
#include "lk/kernels/x86/avx512_vnni/simd.h"

namespace lk::kernels {

const FormatKernels avx512_vnni_int4 = PanelKernels<Avx512VnniSimd, Int4Unpack>::table();

}  // namespace lk::kernels
