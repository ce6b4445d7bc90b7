#include "lk/kernels/x86/avx512/bf16_unpack.h"
#include "lk/kernels/x86/avx512/simd.h"
#include "lk/kernels/x86/avx512_bf16/dot_unit.h"

namespace lk::kernels {

// The unit takes 6 rows and more, as on AMX, both bf16 planes included (down's inputs):
// from there its pair products beat the fp32 kernels (see git log -p BENCHMARKS.md, "Kernels").
const FormatKernels avx512_bf16_bf16 = UnitKernels<Avx512Simd, Bf16Unpack, Bf16Tiles, Avx512Bf16Unit>::table(
    PanelKernels<Avx512Simd, Bf16Unpack>::table<F32Unpack<Avx512Simd, Bf16Unpack>>(), 6);

}  // namespace lk::kernels
