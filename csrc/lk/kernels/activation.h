// Gated activations over one row of gate and up values, written as plain branch-free loops
// with a polynomial exp so each ISA's file (which includes this inside an anonymous
// namespace and compiles it with its own target flags) gets them vectorized.
#pragma once

#include <cstdint>
#include <cstring>

#include "lk/kernels/kernels.h"

namespace lk::kernels {
namespace {

inline float bits_to_float(int32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

// e^x to about 2 ulp for x in [-87, 88]; inputs outside are clamped (callers only divide
// by 1 + e^x, where the clamp is exact to fp32).
inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // Adding and removing 1.5 * 2^23 rounds to the nearest integer without a libm call.
  constexpr float kRound = 12582912.0f;
  const float n = (x * 1.44269504088896341f + kRound) - kRound;
  const float r = x - n * 0.693145751953125f - n * 1.42860682030941723e-6f;  // ln 2 in two parts
  float p = 1.38888889e-3f;  // Taylor terms up to r^6 / 6!; |r| <= ln2 / 2
  p = p * r + 8.33333333e-3f;
  p = p * r + 4.16666667e-2f;
  p = p * r + 1.66666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * bits_to_float((static_cast<int32_t>(n) + 127) << 23);
}

// Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7).
inline float fast_erf(float x) {
  const float sign = x < 0.0f ? -1.0f : 1.0f;
  const float a = x * sign;
  const float t = 1.0f / (1.0f + 0.3275911f * a);
  float poly = 1.061405429f;
  poly = poly * t - 1.453152027f;
  poly = poly * t + 1.421413741f;
  poly = poly * t - 0.284496736f;
  poly = poly * t + 0.254829592f;
  return sign * (1.0f - poly * t * fast_exp(-a * a));
}

void silu_rows(const float* gate, const float* up, int count, float weight, const ActivationParams&, float* out) {
  for (int j = 0; j < count; ++j) out[j] = weight * gate[j] / (1.0f + fast_exp(-gate[j])) * up[j];
}

void gelu_rows(const float* gate, const float* up, int count, float weight, const ActivationParams&, float* out) {
  for (int j = 0; j < count; ++j) {
    out[j] = weight * 0.5f * gate[j] * (1.0f + fast_erf(gate[j] * 0.70710678118654752f)) * up[j];
  }
}

// gpt-oss: gate clamped from above, up clamped both ways and shifted by one, sigmoid slope.
void swiglu_oai_rows(const float* gate, const float* up, int count, float weight, const ActivationParams& params,
                     float* out) {
  const float limit = params.swiglu_limit, alpha = params.swiglu_alpha;
  for (int j = 0; j < count; ++j) {
    const float g = gate[j] > limit ? limit : gate[j];
    float u = up[j] > limit ? limit : up[j];
    u = u < -limit ? -limit : u;
    out[j] = weight * g / (1.0f + fast_exp(-alpha * g)) * (u + 1.0f);
  }
}

constexpr ActivationKernels activation_table() { return ActivationKernels{&silu_rows, &gelu_rows, &swiglu_oai_rows}; }

}  // namespace
}  // namespace lk::kernels
