#include "lk/kernels/generic/scalar_simd.h"

namespace lk::kernels {
namespace {
// The word order of formats.h: word 2c + q holds columns c and c + 8 of rows q and q + 2,
// each as a signed nibble.
struct Decode {
  static constexpr WeightFormat kFormat = WeightFormat::Int4;
  static int nibble(uint16_t word, int shift) { return (((word >> shift) & 0xf) ^ 8) - 8; }
  static void pairs(const uint8_t* block, int32_t (&w)[2][kPanelWidth]) {
    uint16_t words[kPanelWidth];
    __builtin_memcpy(words, block, sizeof words);
    for (int p = 0; p < 2; ++p) {
      for (int j = 0; j < kPanelWidth; ++j) {
        const int shift = 4 * (2 * p + j / 8);
        const int word = 2 * (j % 8);
        w[p][j] = ScalarSimd::pack(nibble(words[word], shift), nibble(words[word + 1], shift));
      }
    }
  }
};
}  // namespace

// Prefill widens a block to its row pairs once.
const FormatKernels generic_int4 = PanelKernels<ScalarSimd, Decode>::table<Int16PairDecode<WeightFormat::Int4>>();

}  // namespace lk::kernels
