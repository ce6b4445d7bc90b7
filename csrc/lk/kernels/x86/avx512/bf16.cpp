#include "lk/kernels/x86/avx512/bf16_decode.h"
#include "lk/kernels/x86/avx512/simd.h"

namespace lk::kernels {

// Prefill widens float panels to fp32 once: Intel cores run vpmovzxwd on an FMA port.
const FormatKernels avx512_bf16 = PanelKernels<Avx512Simd, Bf16Decode>::table<F32Decode<Avx512Simd, Bf16Decode>>();

}  // namespace lk::kernels
