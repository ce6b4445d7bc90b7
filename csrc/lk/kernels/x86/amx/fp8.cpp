#include "lk/kernels/x86/amx/tile_unit.h"
#include "lk/kernels/x86/avx512/fp8_decode.h"
#include "lk/kernels/x86/avx512/simd.h"

namespace lk::kernels {

const FormatKernels amx_fp8 = PackedKernels<Avx512Simd, Fp8Decode, Fp8Tiles<Fp8Decode>, AmxUnit>::table(
    PanelKernels<Avx512Simd, Fp8Decode>::table<F32Decode<Avx512Simd, Fp8Decode>>(), 6);

}  // namespace lk::kernels
