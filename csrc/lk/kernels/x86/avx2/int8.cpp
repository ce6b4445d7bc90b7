#include "lk/kernels/x86/avx2/simd.h"

namespace lk::kernels {
namespace {
// An INT8 block, a pair of rows stored column by column (formats.h): sign-extending its
// bytes to 16 bits gives each column's two weights in one 32-bit lane.
struct Unpack {
  static constexpr WeightFormat kFormat = WeightFormat::Int8;
  // Fetched ahead into L2 only, as the AVX512 Int8Unpack's are: a fetch into L1 holds one of
  // its few miss buffers for a whole DRAM latency (see git log -p BENCHMARKS.md, "Kernels").
  static constexpr int kPrefetchBytes = 4096;
  static constexpr bool kPrefetchIntoL2 = true;
  static void pairs(const uint8_t* block, __m256i (&w)[1][2]) {
    w[0][0] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block)));
    w[0][1] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(block + 16)));
  }
};
}  // namespace

// Prefill does not widen: a pass's sign extensions issue beside its vpmaddwd, which bound it.
const FormatKernels avx2_int8 = PanelKernels<Avx2Simd, Unpack>::table();

}  // namespace lk::kernels
