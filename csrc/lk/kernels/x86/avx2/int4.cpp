#include "lk/kernels/x86/avx2/simd.h"

namespace lk::kernels {
namespace {
// Nibble s of every 16-bit word holds one column half of a row pair (formats.h): shifting
// it to the top and back, arithmetically, unpacks it sign-extended, four rows of 16 columns
// from one 32-byte load.
struct Decode {
  static constexpr WeightFormat kFormat = WeightFormat::Int4;
  // Decode fetches INT4 panels 4 KiB ahead, not 2: whole-layer decode at Qwen3-30B's shape
  // took 8-14% more of the read bandwidth at 1 and 4 tokens and 5% at 16, in 13 of 13
  // paired comparisons over two sessions (Zen 3); 6-8% more against 2 KiB and 1 KiB
  // switched between interleaved calls in one process. 8 KiB was level.
  static constexpr int kPrefetchBytes = 4096;
  // The pair takes 2 rows, though the register count allows 1: with both panels' unpacked
  // pairs live GCC does not spill an accumulator chain here. In cache 2 rows took 0.635 ns
  // per panel row as a pair against 0.68 one panel at a time, and whole-layer decode
  // at Qwen3-30B's shape gained 3-5% at 16 tokens and 0-3% at 4 (switched in one process).
  static constexpr int kPairRows = 2;
  static void pairs(const uint8_t* block, __m256i (&w)[2][2]) {
    const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block));
    w[0][0] = _mm256_srai_epi16(_mm256_slli_epi16(words, 12), 12);
    w[0][1] = _mm256_srai_epi16(_mm256_slli_epi16(words, 8), 12);
    w[1][0] = _mm256_srai_epi16(_mm256_slli_epi16(words, 4), 12);
    w[1][1] = _mm256_srai_epi16(words, 12);
  }
};

// What prefill widens INT4 to: INT8's layout, its values and scales kept. A pass over it
// costs what an INT8 pass costs, its sign extensions issuing beside the vpmaddwd that
// bound it, where unpacking nibbles in every pass competes with them.
struct WidenedDecode {
  static constexpr WeightFormat kFormat = WeightFormat::Int4;
  static constexpr int kBlockRows = kInt8RowsPerBlock;
  static constexpr int kBlockBytes = block_bytes(WeightFormat::Int8);
  static void pairs(const uint8_t* block, __m256i (&w)[1][2]) { int8_pairs(block, w); }
  // Narrowing packs each 128-bit half; the permute puts the columns back in order.
  static void pack(const __m256i (&w)[2], uint8_t* pair) {
    const __m256i bytes = _mm256_permute4x64_epi64(_mm256_packs_epi16(w[0], w[1]), 0xd8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(pair), bytes);
  }
};

// Widening pays from 4 passes of 3 rows on (in cache, ns per panel row, unwidened ->
// widened: 9 rows 3.0-3.2 -> 3.0-3.2, 12 rows 4.0-4.4 -> 3.9, 24 rows 8.0-8.1 -> 7.0,
// 64 rows 21.6-22.1 -> 18.0-19.3).
constexpr int kWidenRows = 12;
}  // namespace

const FormatKernels avx2_int4 = PanelKernels<Avx2Simd, Decode>::table<WidenedDecode>(kWidenRows);

}  // namespace lk::kernels
