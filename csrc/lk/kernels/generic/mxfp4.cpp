#include "lk/kernels/generic/scalar_simd.h"

namespace lk::kernels {
namespace {
// INT4's word order (formats.h), each nibble an e2m1 code: twice its value, signed, in the
// low and high halves of a pair (INT4's generic decode, without its offset).
struct Decode {
  static constexpr WeightFormat kFormat = WeightFormat::Mxfp4;
  static int doubled(uint16_t word, int shift) { return kMxfp4Doubled[(word >> shift) & 0xf]; }
  static void pairs(const uint8_t* block, int32_t (&w)[2][kPanelWidth]) {
    uint16_t words[kPanelWidth];
    __builtin_memcpy(words, block, sizeof words);
    for (int p = 0; p < 2; ++p) {
      for (int j = 0; j < kPanelWidth; ++j) {
        const int shift = 4 * (2 * p + j / 8);
        const int word = 2 * (j % 8);
        w[p][j] = ScalarSimd::pack(doubled(words[word], shift), doubled(words[word + 1], shift));
      }
    }
  }
};
}  // namespace

// Prefill widens a block to its row pairs once, as INT4 does.
const FormatKernels generic_mxfp4 = PanelKernels<ScalarSimd, Decode>::table<Int16PairDecode<WeightFormat::Mxfp4>>();

}  // namespace lk::kernels
