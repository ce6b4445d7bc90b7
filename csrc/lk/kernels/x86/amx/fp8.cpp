#include "lk/kernels/x86/amx/tile_gemm.h"
#include "lk/kernels/x86/avx512/fp8_decode.h"
#include "lk/kernels/x86/avx512/simd.h"

namespace lk::kernels {

const FormatKernels amx_fp8 = TileKernels<Avx512Simd, Fp8Decode, Fp8Tiles<Fp8Decode>>::table(
    PanelKernels<Avx512Simd, Fp8Decode>::table<F32Decode<Avx512Simd, Fp8Decode>>(), 6);

}  // namespace lk::kernels
