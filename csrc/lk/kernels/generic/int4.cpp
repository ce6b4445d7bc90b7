#include "lk/kernels/generic/scalar_simd.h"

namespace lk::kernels {
namespace {
struct Int4Decode {
  static constexpr int kRowBytes = kInt4BytesPerRow;
  static void values(const uint8_t* row, float (&w)[kPanelWidth]) {
    for (int j = 0; j < kInt4BytesPerRow; ++j) {
      w[j] = static_cast<float>(row[j] & 0xf);
      w[j + kInt4BytesPerRow] = static_cast<float>(row[j] >> 4);
    }
  }
};
using Loader = ScaledLoader<ScalarSimd, WeightFormat::Int4, Int4Decode>;
}  // namespace

const FormatKernels generic_int4 = PanelKernels<ScalarSimd, Loader>::table();

}  // namespace lk::kernels
