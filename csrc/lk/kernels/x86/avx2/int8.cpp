#include "lk/kernels/x86/avx2/simd.h"

namespace lk::kernels {
namespace {
struct Decode {
  static constexpr WeightFormat kFormat = WeightFormat::Int8;
  static void pairs(const uint8_t* block, __m256i (&w)[1][2]) { int8_pairs(block, w); }
};
}  // namespace

// Prefill does not widen: a pass's sign extensions issue beside its vpmaddwd, which bound it.
const FormatKernels avx2_int8 = PanelKernels<Avx2Simd, Decode>::table();

}  // namespace lk::kernels
