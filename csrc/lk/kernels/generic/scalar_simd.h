// One-lane "vector" so the portable fallback reuses the shared panel multiply and loaders.
#pragma once

#include "lk/kernels/panel_gemm.h"

namespace lk::kernels {
namespace {

struct ScalarSimd {
  using Vec = float;
  static constexpr int kLanes = 1;
  static constexpr int kAccumulators = 32;
  static constexpr int kMainRows = 2;
  static constexpr int kIntegerMainRows = 2;
  static constexpr bool kPairPanels = false;
  static Vec zero() { return 0.0f; }
  static Vec set1(float value) { return value; }
  static Vec broadcast(const float* p) { return *p; }
  static Vec fmadd(Vec a, Vec b, Vec c) { return a * b + c; }
  static Vec mul(Vec a, Vec b) { return a * b; }
  static Vec add(Vec a, Vec b) { return a + b; }
  static Vec load(const float* p) { return *p; }
  static void store(float* p, Vec v) { *p = v; }
  static void prefetch(const void* p) { __builtin_prefetch(p); }

  // Two 16-bit values in one 32-bit word, the first in the low half (integer formats), or
  // their 32-bit sums.
  using IVec = int32_t;
  static IVec pack(int low, int high) {
    return static_cast<IVec>(static_cast<uint16_t>(low) | static_cast<uint32_t>(static_cast<uint16_t>(high)) << 16);
  }
  static int low_int(IVec v) { return static_cast<int16_t>(v); }
  static int high_int(IVec v) { return v >> 16; }
  static IVec broadcast_pair(const int16_t* p) { return pack(p[0], p[1]); }
  static IVec dot_add(IVec acc, IVec w, IVec x) { return acc + low_int(w) * low_int(x) + high_int(w) * high_int(x); }
  static Vec to_float(IVec v) { return static_cast<float>(v); }
};

// Unpacks rows whose kPanelWidth elements are each converted by `to_float`.
template <WeightFormat kStoredFormat, class Stored, float (*to_float)(Stored)>
struct ScalarUnpack {
  static constexpr WeightFormat kFormat = kStoredFormat;
  static void values(const uint8_t* row, float (&w)[kPanelWidth]) {
    Stored stored[kPanelWidth];
    __builtin_memcpy(stored, row, sizeof stored);
    for (int j = 0; j < kPanelWidth; ++j) w[j] = to_float(stored[j]);
  }
};

// A block of four rows in INT4's word order (formats.h) as its two row pairs, each nibble
// turned into a small integer by `value_of` (INT4: signed value; MXFP4: doubled e2m1 code).
template <int (*value_of)(int nibble)>
struct NibbleBlockUnpack {
  static void pairs(const uint8_t* block, int32_t (&w)[2][kPanelWidth]) {
    uint16_t words[kPanelWidth];
    __builtin_memcpy(words, block, sizeof words);
    for (int p = 0; p < 2; ++p) {
      for (int j = 0; j < kPanelWidth; ++j) {
        const int shift = 4 * (2 * p + j / 8);
        const int word = 2 * (j % 8);
        w[p][j] = ScalarSimd::pack(value_of((words[word] >> shift) & 0xf), value_of((words[word + 1] >> shift) & 0xf));
      }
    }
  }
};

// Each nibble an e2m1 code: twice its value, signed (MXFP4 and NVFP4 share the values, not the scales).
inline int e2m1_doubled(int code) { return kMxfp4Doubled[code]; }

template <WeightFormat kE2m1Format>
struct E2m1BlockUnpack : NibbleBlockUnpack<e2m1_doubled> {
  static constexpr WeightFormat kFormat = kE2m1Format;
};

// What prefill widens INT8 and INT4 to: the row pairs the integer kernels multiply, one
// word per column as in registers, so a pass only loads them (the generic pass unpacks
// every weight again otherwise).
template <WeightFormat kStoredFormat>
struct Int16PairUnpack {
  static constexpr WeightFormat kFormat = kStoredFormat;
  static constexpr int kBlockRows = 2;
  static constexpr int kBlockBytes = kPanelWidth * sizeof(ScalarSimd::IVec);
  static void pairs(const uint8_t* block, ScalarSimd::IVec (&w)[1][kPanelWidth]) {
    __builtin_memcpy(w[0], block, kBlockBytes);
  }
  static void pack(const ScalarSimd::IVec (&w)[kPanelWidth], uint8_t* pair) { __builtin_memcpy(pair, w, kBlockBytes); }
};

}  // namespace
}  // namespace lk::kernels
