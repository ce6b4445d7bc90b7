#include "lk/kernels/x86/avx2/simd.h"

namespace lk::kernels {
namespace {
// Read as bytes (formats.h), each 32-bit lane of a block holds four rows of columns j (low
// nibbles) and j + 8 (high nibbles): an XOR, a shift and two masks give them as unsigned bytes,
// which vpmaddubsw multiplies by 8-bit activations, 32 products per instruction. Multiplying
// sign-extended 16-bit pairs with vpmaddwd took 1.4-1.5x as long per weight in cache
// (1 to 3 rows), and INT4 decode at 16 tokens was bound by it.
struct Decode {
  static constexpr WeightFormat kFormat = WeightFormat::Int4;
  // Decode fetches INT4 panels 4 KiB ahead, not 2: whole-layer decode at Qwen3-30B's shape
  // took 8-14% more of the read bandwidth at 1 and 4 tokens and 5% at 16, in 13 of 13
  // paired comparisons over two sessions (Zen 3); 6-8% more against 2 KiB and 1 KiB
  // switched between interleaved calls in one process. 8 KiB was level. With the byte
  // kernel, 1, 2 and 8 KiB were level with 4 KiB or up to 6% slower (in one process).
  // Since then 6 KiB into L2 only, as the AVX-512 INT4 decode: on a Xeon forced to this
  // tier, builds alternated process by process, 4 rounds, 1.02-1.035x (median) at 1, 4 and
  // 16 tokens, faster in 11 of 12. Not rechecked on Zen 3.
  static constexpr int kPrefetchBytes = 6144;
  static constexpr bool kPrefetchIntoL2 = true;
  // Stored values are q - 8 as 4-bit two's complement: flipping bit 3 of each nibble gives q.
  static constexpr int kQuadBias = 8;
  static void quads(const uint8_t* block, __m256i (&w)[2]) {
    const __m256i words = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(block)),
                                           _mm256_set1_epi8(static_cast<char>(0x88)));
    const __m256i nibble = _mm256_set1_epi8(0x0f);
    w[0] = _mm256_and_si256(words, nibble);
    w[1] = _mm256_and_si256(_mm256_srli_epi16(words, 4), nibble);
  }
};

}  // namespace

const FormatKernels avx2_int4 = PanelKernels<Avx2Simd, Decode>::table();

}  // namespace lk::kernels
