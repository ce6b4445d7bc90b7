#include "lk/kernels/x86/avx2/simd.h"

namespace lk::kernels {
namespace {
// e4m3fn sign-extended to 32 bits and shifted so its exponent and mantissa land in the low
// bits of the fp32 exponent and the top of its mantissa, with the sign's copies masked off,
// reads as the value times 2^-120: e4m3 subnormals become fp32 denormals, exactly. No
// conversion instruction, which makes it cheaper than unpacking through F16C on this tier.
//
// Such tiny weights times activations below 2^-6 or so are fp32 denormals too, and Intel
// cores take a slow microcode assist on each instruction that makes or reads one. So the
// kernels read activations times 2^64 (kActivationScale; they must
// stay below 2^64 in magnitude): a product is then the true one times 2^-56, denormal only
// below 2^-70. What remains is e4m3 subnormal weights (below 2^-6, against 448 at most),
// rare in quantized checkpoints: each is an fp32 denormal input, which such cores run
// slowly and a thread with DAZ set would read as zero. The AVX512 file keeps F16C.
//
// The row's 16 bytes are sign-extended to 16 bits at once; each 32-bit lane then holds two
// columns, and one shift per parity puts either in place (the other's bits fall outside the
// mask). Three shuffle-port ops per 16 weights instead of four: in decode those ports bound
// the rate at which a core consumes weights.
struct Unpack {
  static constexpr WeightFormat kFormat = WeightFormat::Fp8E4M3;
  static constexpr float kValueScale = 0x1p-120f;
  static constexpr float kActivationScale = 0x1p64f;
  // Farther ahead than the AVX2 default: FP8 rows are short (see git log -p BENCHMARKS.md, "Kernels").
  static constexpr int kPrefetchBytes = 2048;
  static void values(const uint8_t* row, __m256 (&w)[2]) {
    const __m256i words = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row)));
    const __m256i mask = _mm256_set1_epi32(static_cast<int>(0x87f00000u));
    w[0] = _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(words, 20), mask));
    w[1] = _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(words, 4), mask));
  }
  static void to_column_order(__m256 (&w)[2]) { even_odd_to_column_order(w); }
};
}  // namespace

// Prefill widens panels to fp32 from 40 rows per expert on: a pass then unpacks nothing,
// where an FP8 pass spends five ops per 16 weights beside 12 FMAs, on the FMA ports of
// Intel cores. Fewer rows do not repay the widening (see git log -p BENCHMARKS.md, "Kernels").
const FormatKernels avx2_fp8 = PanelKernels<Avx2Simd, Unpack>::table<F32Unpack<Avx2Simd, Unpack>>(40);

}  // namespace lk::kernels
