#include "lk/kernels/x86/avx512/integer_unpack.h"
#include "lk/kernels/x86/avx512_vnni/simd.h"

namespace lk::kernels {

// AVX512_VNNI's kernels built with AVX512_VBMI (which this level implies): vpermb looks the
// codes up without masking them. AMX keeps these kernels.
const FormatKernels avx512_bf16_mxfp4 = PanelKernels<Avx512VnniSimd, Mxfp4Unpack>::table();

}  // namespace lk::kernels
