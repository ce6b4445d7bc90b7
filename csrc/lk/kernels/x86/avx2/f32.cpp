#include "lk/kernels/x86/avx2/simd.h"

namespace lk::kernels {
namespace {
struct Decode {
  static constexpr WeightFormat kFormat = WeightFormat::F32;
  static void values(const uint8_t* row, __m256 (&w)[2]) {
    w[0] = _mm256_loadu_ps(reinterpret_cast<const float*>(row));
    w[1] = _mm256_loadu_ps(reinterpret_cast<const float*>(row) + 8);
  }
};
}  // namespace

const FormatKernels avx2_f32 = PanelKernels<Avx2Simd, Decode>::table();

}  // namespace lk::kernels
