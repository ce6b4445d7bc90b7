#include "lk/kernels/x86/avx512/fp8_unpack.h"
#include "lk/kernels/x86/avx512/simd.h"
#include "lk/kernels/x86/avx512_bf16/dot_unit.h"

namespace lk::kernels {

// The unit takes 6 rows and more, as on AMX, both bf16 planes included (down's inputs):
// from there its pair products beat the fp32 kernels (see git log -p BENCHMARKS.md, "Kernels").
const FormatKernels avx512_bf16_fp8 = UnitKernels<Avx512Simd, Fp8Unpack, Fp8Tiles<Fp8Unpack>, Avx512Bf16Unit>::table(
    PanelKernels<Avx512Simd, Fp8Unpack>::table<F32Unpack<Avx512Simd, Fp8Unpack>>(), 6);

}  // namespace lk::kernels
