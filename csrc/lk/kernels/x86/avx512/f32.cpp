#include "lk/kernels/x86/avx512/simd.h"

namespace lk::kernels {
namespace {
struct Decode {
  static constexpr WeightFormat kFormat = WeightFormat::F32;
  static void values(const uint8_t* row, __m512 (&w)[1]) { w[0] = _mm512_loadu_ps(row); }
};
}  // namespace

const FormatKernels avx512_f32 = PanelKernels<Avx512Simd, Decode>::table();

}  // namespace lk::kernels
