#include "lk/kernels/x86/amx/tile_unit.h"
#include "lk/kernels/x86/avx512/bf16_decode.h"
#include "lk/kernels/x86/avx512/simd.h"

namespace lk::kernels {

// Tiles from 6 rows: in cache, one core, a pair of 2048-deep panels costs the tiles about
// 0.96 ns per panel row up to 16 rows, the AVX-512 kernels 0.86 at 4 rows and 1.13 at 6.
const FormatKernels amx_bf16 = PackedKernels<Avx512Simd, Bf16Decode, Bf16Tiles, AmxUnit>::table(
    PanelKernels<Avx512Simd, Bf16Decode>::table<F32Decode<Avx512Simd, Bf16Decode>>(), 6);

}  // namespace lk::kernels
