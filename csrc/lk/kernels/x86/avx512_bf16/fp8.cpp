#include "lk/kernels/x86/avx512/fp8_decode.h"
#include "lk/kernels/x86/avx512/simd.h"
#include "lk/kernels/x86/avx512_bf16/dot_unit.h"

namespace lk::kernels {

// Packed from 6 rows, as on AMX: from 16, a Qwen3-30B layer took 1.06-1.21x as long at 128 and
// 256 tokens (bf16; FP8 1.11-1.18x). Rows that need both bf16 planes (down's inputs) from 15:
// below, the fp32 kernels took 0.65-0.92x the time in cache (6-12 rows, bf16 and FP8).
const FormatKernels avx512_bf16dot_fp8 = PackedKernels<Avx512Simd, Fp8Decode, Fp8Tiles<Fp8Decode>, Bf16DotUnit>::table(
    PanelKernels<Avx512Simd, Fp8Decode>::table<F32Decode<Avx512Simd, Fp8Decode>>(), 6, 15);

}  // namespace lk::kernels
