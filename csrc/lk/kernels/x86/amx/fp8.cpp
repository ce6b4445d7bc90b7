#include "lk/kernels/x86/amx/tile_unit.h"
#include "lk/kernels/x86/avx512/fp8_unpack.h"
#include "lk/kernels/x86/avx512/simd.h"

namespace lk::kernels {

const FormatKernels amx_fp8 = UnitKernels<Avx512Simd, Fp8Unpack, Fp8Tiles<Fp8Unpack>, AmxUnit>::table(
    PanelKernels<Avx512Simd, Fp8Unpack>::table<F32Unpack<Avx512Simd, Fp8Unpack>>(), 6);

}  // namespace lk::kernels
