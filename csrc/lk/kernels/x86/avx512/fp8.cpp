#include "lk/kernels/x86/avx512/fp8_unpack.h"
#include "lk/kernels/x86/avx512/simd.h"

namespace lk::kernels {

// Prefill widens to fp32 once, as bf16 does.
const FormatKernels avx512_fp8 = PanelKernels<Avx512Simd, Fp8Unpack>::table<F32Unpack<Avx512Simd, Fp8Unpack>>();

}  // namespace lk::kernels
