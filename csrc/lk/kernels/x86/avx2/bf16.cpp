#include "lk/kernels/x86/avx2/simd.h"

namespace lk::kernels {
namespace {
// bf16 is the top half of an fp32. One 32-byte load holds a row's 16 columns, two per
// 32-bit lane: masking off the low half leaves the odd columns as fp32, shifting it up
// gives the even ones. One shift and one AND per 16 weights, where widening each half
// with vpmovzxwd and shifting it takes four shuffle-port ops; in decode those ports, not
// the FMAs, bound the rate at which a core consumes weights.
struct Unpack {
  static constexpr WeightFormat kFormat = WeightFormat::BF16;
  static void values(const uint8_t* row, __m256 (&w)[2]) {
    const __m256i words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row));
    w[0] = _mm256_castsi256_ps(_mm256_slli_epi32(words, 16));
    w[1] = _mm256_castsi256_ps(_mm256_and_si256(words, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  }
  static void to_column_order(__m256 (&w)[2]) { even_odd_to_column_order(w); }
};
}  // namespace

// Prefill converts each weight again in every 6-row pass instead of widening a panel to
// fp32 once: the conversions issue beside the FMA pipes, so widening would cost more than
// it saves (see git log -p BENCHMARKS.md, "Kernels").
const FormatKernels avx2_bf16 = PanelKernels<Avx2Simd, Unpack>::table();

}  // namespace lk::kernels
