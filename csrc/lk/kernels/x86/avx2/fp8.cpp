#include "lk/kernels/x86/avx2/simd.h"

namespace lk::kernels {
namespace {
// e4m3fn sign-extended to 32 bits and shifted so its exponent and mantissa land in the low
// bits of the fp32 exponent and the top of its mantissa, with the sign's copies masked off,
// reads as the value times 2^-120: e4m3 subnormals become fp32 denormals, exactly. Three
// integer ops per 8 weights and no conversion: on this AVX2 floor (Zen 3, measured) that
// decodes 1.6x as fast as through F16C. The price is fp32 denormals: products whose true
// magnitude is below 2^-6 (in e4m3 units, so against 448 at most) are denormal and keep
// fewer bits, still within 2^-29 of them absolutely, and a thread with DAZ set would read
// subnormal weights as zero. CPUs that take microcode assists on denormals (some Intel
// cores) run such rare products slowly; the AVX-512 file keeps F16C.
struct Decode {
  static constexpr WeightFormat kFormat = WeightFormat::Fp8E4M3;
  static constexpr float kValueScale = 0x1p-120f;
  static __m256 widen8(const uint8_t* p) {
    const __m256i bytes = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_and_si256(_mm256_slli_epi32(bytes, 20), _mm256_set1_epi32(static_cast<int>(0x87f00000u))));
  }
  static void values(const uint8_t* row, __m256 (&w)[2]) {
    w[0] = widen8(row);
    w[1] = widen8(row + 8);
  }
};
}  // namespace

const FormatKernels avx2_fp8 = PanelKernels<Avx2Simd, Decode>::table();

}  // namespace lk::kernels
