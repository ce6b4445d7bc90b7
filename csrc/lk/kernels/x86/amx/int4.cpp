#include "lk/kernels/x86/amx/tile_unit.h"
#include "lk/kernels/x86/avx512/integer_unpack.h"
#include "lk/kernels/x86/avx512_vnni/simd.h"

namespace lk::kernels {

// Tiles from 12 rows: the AVX512_VNNI kernels multiply bytes fast enough to stay ahead below that
// (see git log -p BENCHMARKS.md, "Kernels").
const FormatKernels amx_int4 = UnitKernels<Avx512VnniSimd, Int4Unpack, Int4Tiles<Int4Unpack>, AmxUnit>::table(
    PanelKernels<Avx512VnniSimd, Int4Unpack>::table(), 12);

}  // namespace lk::kernels
