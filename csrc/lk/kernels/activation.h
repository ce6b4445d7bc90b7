// Gated activations over one row of gate and up values, written as plain branch-free loops
// with a polynomial exp so each ISA's file (which includes this inside an anonymous
// namespace and compiles it with its own target flags) gets them vectorized.
#pragma once

#include <cstddef>
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

// e^x to about 2 ulp for x in [-87, 60]; inputs outside are clamped. The callers divide by
// 1 + e^x, so above 60 only a quotient below 1e-26 of its dividend changes. The bound is
// not 88 (where fp32 ends) because GCC's branch-free code computes the clamped case in
// every lane: g / (1 + e^88) is an fp32 subnormal for any |g| < 2, each one a slow
// microcode assist.
inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 60.0f ? 60.0f : x;
  const float n = round_to_integer(x * 1.44269504088896341f);
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

// One panel's rows of a chunk in one call (ActivationRows), so that the constants are
// loaded once per chunk, not once per row.
template <class Gated>
inline void panel_rows(const float* gate, const float* up, int rows, int count, const float* weights, float* out,
                       std::size_t out_stride, Gated gated) {
  for (int r = 0; r < rows; ++r) {
    const float weight = weights[r];
    const float* g = gate + r * kPanelWidth;
    const float* u = up + r * kPanelWidth;
    float* o = out + r * out_stride;
    for (int j = 0; j < count; ++j) o[j] = weight * gated(g[j], u[j]);
  }
}

void silu_rows(const float* gate, const float* up, int rows, int count, const float* weights, const ActivationParams&,
               float* out, std::size_t out_stride) {
  panel_rows(gate, up, rows, count, weights, out, out_stride,
             [](float g, float u) { return g / (1.0f + fast_exp(-g)) * u; });
}

void gelu_rows(const float* gate, const float* up, int rows, int count, const float* weights, const ActivationParams&,
               float* out, std::size_t out_stride) {
  panel_rows(gate, up, rows, count, weights, out, out_stride,
             [](float g, float u) { return 0.5f * g * (1.0f + fast_erf(g * 0.70710678118654752f)) * u; });
}

// gpt-oss: gate clamped from above, up clamped both ways and shifted by one, sigmoid slope.
void swiglu_oai_rows(const float* gate, const float* up, int rows, int count, const float* weights,
                     const ActivationParams& params, float* out, std::size_t out_stride) {
  const float limit = params.swiglu_limit, alpha = params.swiglu_alpha;
  panel_rows(gate, up, rows, count, weights, out, out_stride, [=](float gate_value, float up_value) {
    const float g = gate_value > limit ? limit : gate_value;
    float u = up_value > limit ? limit : up_value;
    u = u < -limit ? -limit : u;
    return g / (1.0f + fast_exp(-alpha * g)) * (u + 1.0f);
  });
}

// GELU's tanh form (Gemma): 0.5 g (1 + tanh z) = g / (1 + e^-2z), z = sqrt(2/pi) (g + 0.044715 g^3).
void gelu_tanh_rows(const float* gate, const float* up, int rows, int count, const float* weights,
                    const ActivationParams&, float* out, std::size_t out_stride) {
  panel_rows(gate, up, rows, count, weights, out, out_stride, [](float g, float u) {
    const float z = 0.79788456080286536f * (g + 0.044715f * g * g * g);
    return g / (1.0f + fast_exp(-2.0f * z)) * u;
  });
}

constexpr ActivationKernels activation_table() {
  return ActivationKernels{&silu_rows, &gelu_rows, &swiglu_oai_rows, &gelu_tanh_rows};
}

}  // namespace
}  // namespace lk::kernels
