#include "lk/kernels/x86/amx/tile_unit.h"
#include "lk/kernels/x86/avx512/integer_decode.h"
#include "lk/kernels/x86/avx512_vnni/simd.h"

namespace lk::kernels {

// Tiles from 12 rows: in cache, one core, a pair of 2048-deep panels costs the tiles about
// 0.94 ns per panel row up to 16 rows, the VNNI kernels 0.65 at 8 rows and 0.97 at 12.
const FormatKernels amx_int4 = PackedKernels<Avx512VnniSimd, Int4Decode, Int4Tiles<Int4Decode>, AmxUnit>::table(
    PanelKernels<Avx512VnniSimd, Int4Decode>::table(), 12);

}  // namespace lk::kernels
