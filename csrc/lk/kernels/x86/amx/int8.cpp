#include "lk/kernels/x86/amx/tile_unit.h"
#include "lk/kernels/x86/avx512/integer_unpack.h"
#include "lk/kernels/x86/avx512_vnni/simd.h"

namespace lk::kernels {

// Tiles from 9 rows, beyond one pass of the AVX512_VNNI kernels, where they overtake them (see
// git log -p BENCHMARKS.md, "Kernels").
const FormatKernels amx_int8 =
    UnitKernels<Avx512VnniSimd, Int8Unpack, Int8Tiles, AmxUnit>::table(PanelKernels<Avx512VnniSimd, Int8Unpack>::table(), 9);

}  // namespace lk::kernels
