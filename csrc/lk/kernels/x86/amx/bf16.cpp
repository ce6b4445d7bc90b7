#include "lk/kernels/x86/amx/tile_unit.h"
#include "lk/kernels/x86/avx512/bf16_decode.h"
#include "lk/kernels/x86/avx512/simd.h"

namespace lk::kernels {

// Tiles from 6 rows, where they overtake the AVX-512 kernels (see BENCHMARKS.md, "Kernels").
const FormatKernels amx_bf16 = PackedKernels<Avx512Simd, Bf16Decode, Bf16Tiles, AmxUnit>::table(
    PanelKernels<Avx512Simd, Bf16Decode>::table<F32Decode<Avx512Simd, Bf16Decode>>(), 6);

}  // namespace lk::kernels
