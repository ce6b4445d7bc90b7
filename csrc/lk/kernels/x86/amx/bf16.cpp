#include "lk/kernels/x86/amx/tile_unit.h"
#include "lk/kernels/x86/avx512/bf16_unpack.h"
#include "lk/kernels/x86/avx512/simd.h"

namespace lk::kernels {

// Tiles from 6 rows, where they overtake the AVX512 kernels (see git log -p BENCHMARKS.md, "Kernels").
const FormatKernels amx_bf16 = UnitKernels<Avx512Simd, Bf16Unpack, Bf16Tiles, AmxUnit>::table(
    PanelKernels<Avx512Simd, Bf16Unpack>::table<F32Unpack<Avx512Simd, Bf16Unpack>>(), 6);

}  // namespace lk::kernels
