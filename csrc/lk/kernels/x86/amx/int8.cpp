#include "lk/kernels/x86/amx/tile_unit.h"
#include "lk/kernels/x86/avx512/integer_decode.h"
#include "lk/kernels/x86/avx512_vnni/simd.h"

namespace lk::kernels {

// Tiles from 9 rows, beyond one pass of the VNNI kernels: in cache, one core, a pair of
// 2048-deep panels costs the tiles about 1.09 ns per panel row up to 16 rows, the VNNI
// kernels 0.94 at 8 rows and 1.5 at 12.
const FormatKernels amx_int8 =
    PackedKernels<Avx512VnniSimd, Int8Decode, Int8Tiles, AmxUnit>::table(PanelKernels<Avx512VnniSimd, Int8Decode>::table(), 9);

}  // namespace lk::kernels
