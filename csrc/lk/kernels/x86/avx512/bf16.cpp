#include "lk/kernels/x86/avx512/bf16_unpack.h"
#include "lk/kernels/x86/avx512/simd.h"

namespace lk::kernels {

// Prefill widens float panels to fp32 once: Intel cores run vpmovzxwd on an FMA port.
const FormatKernels avx512_bf16 = PanelKernels<Avx512Simd, Bf16Unpack>::table<F32Unpack<Avx512Simd, Bf16Unpack>>();

}  // namespace lk::kernels
