#include "lk/kernels/x86/avx2/simd.h"

namespace lk::kernels {
namespace {
// Read as bytes (formats.h), each 32-bit lane of a block holds four rows of columns j (low
// nibbles) and j + 8 (high nibbles): an XOR, a shift and two masks give them as unsigned bytes,
// which vpmaddubsw multiplies by 8-bit activations, 32 products per instruction: twice
// vpmaddwd's 16 on sign-extended pairs, which bounds INT4 decode at several rows.
struct Unpack {
  static constexpr WeightFormat kFormat = WeightFormat::Int4;
  // INT4 panels are short per row, so decode fetches them farther ahead than the AVX2
  // default, into L2 only as the AVX512 Int4Unpack does, leaving L1's few outstanding
  // misses to the loads (see git log -p BENCHMARKS.md, "Kernels").
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

const FormatKernels avx2_int4 = PanelKernels<Avx2Simd, Unpack>::table();

}  // namespace lk::kernels
