#include "lk/kernels/x86/avx512/bf16_decode.h"
#include "lk/kernels/x86/avx512/simd.h"
#include "lk/kernels/x86/avx512_bf16/dot_unit.h"

namespace lk::kernels {

// Packed from 6 rows, as on AMX: from 16, a Qwen3-30B layer took 1.06-1.21x as long at 128 and
// 256 tokens (bf16; FP8 1.11-1.18x). So are rows that need both bf16 planes (down's inputs):
// since the last pass stops at the last row, down's pairs of panels at 6-14 rows ran
// 1.01-1.27x as fast in cache as on the fp32 kernels, and the layer at 128 and 256 tokens
// 1.03x (bf16) and 1.07-1.08x (FP8) as fast as with those rows below 15 left to them (a
// lone panel, the odd one of a run of down panels, at 6-10 rows: 0.78-0.97x).
const FormatKernels avx512_bf16dot_bf16 = PackedKernels<Avx512Simd, Bf16Decode, Bf16Tiles, Bf16DotUnit>::table(
    PanelKernels<Avx512Simd, Bf16Decode>::table<F32Decode<Avx512Simd, Bf16Decode>>(), 6);

}  // namespace lk::kernels
