// Types shared by the engine and its kernels. Nothing here knows about Python or vLLM.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace lk {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };
constexpr int kNumDTypes = 3;

enum class Activation : int { Silu = 0, Gelu = 1, SwigluOai = 2, GeluTanh = 3 };
constexpr int kNumActivations = 4;

// Every packed weight panel holds this many output columns, interleaved per k:
// panel[k * kPanelWidth + j] multiplies input k for output column j.
constexpr int kPanelWidth = 16;

// std::nearbyint (ties to even) for |v| < 2^22, without its libm call: code built for any
// x86-64 has no instruction to inline it with, and quantization rounds every value. Adding
// and removing 1.5 * 2^23 leaves v rounded to an integer in the default rounding mode.
// Static, as formats.h's helpers are, so each kernel file compiled with its own ISA flags
// keeps its own copy.
static inline float round_to_integer(float v) {
  constexpr float kRound = 12582912.0f;
  return (v + kRound) - kRound;
}

inline float bf16_to_float(uint16_t bits) {
  uint32_t widened = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &widened, sizeof value);
  return value;
}

inline uint16_t float_to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);  // quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(bits >> 16);
}

inline float f16_to_float(uint16_t bits) {
  const uint32_t sign = static_cast<uint32_t>(bits & 0x8000u) << 16;
  uint32_t exponent = (bits >> 10) & 0x1fu;
  uint32_t mantissa = bits & 0x3ffu;
  uint32_t out;
  if (exponent == 0x1f) {
    out = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    out = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    out = sign;
  } else {  // subnormal half: normalise
    exponent = 113;
    while ((mantissa & 0x400u) == 0) {
      mantissa <<= 1;
      --exponent;
    }
    out = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float value;
  std::memcpy(&value, &out, sizeof value);
  return value;
}

inline uint16_t float_to_f16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return sign | 0x7e00u;        // NaN
  if (magnitude >= 0x477ff000u) return sign | 0x7c00u;       // overflow (incl. inf) after rounding
  if (magnitude < 0x38800000u) {                             // result is subnormal or zero
    if (magnitude < 0x33000000u) return sign;                // below half of the smallest subnormal
    const uint32_t shift = 126 - (magnitude >> 23);
    const uint32_t mantissa = (magnitude & 0x7fffffu) | 0x800000u;
    uint32_t half = mantissa >> shift;
    const uint32_t remainder = mantissa & ((1u << shift) - 1);
    const uint32_t halfway = 1u << (shift - 1);
    if (remainder > halfway || (remainder == halfway && (half & 1u))) ++half;
    return sign | static_cast<uint16_t>(half);
  }
  uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u) - (112u << 23);
  return sign | static_cast<uint16_t>(rounded >> 13);
}

// float8 e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities.
constexpr float fp8_e4m3_to_float(uint8_t bits) {
  const int exponent = (bits >> 3) & 0xf, mantissa = bits & 0x7;
  const uint32_t widened = (static_cast<uint32_t>(exponent + 120) << 23) | (static_cast<uint32_t>(mantissa) << 20);
  const float magnitude = exponent == 0 ? mantissa * (1.0f / 512.0f) : __builtin_bit_cast(float, widened);
  return (bits & 0x80) ? -magnitude : magnitude;
}

inline float load_as_float(const void* base, std::size_t index, DType type) {
  switch (type) {
    case DType::F32: return static_cast<const float*>(base)[index];
    case DType::F16: return f16_to_float(static_cast<const uint16_t*>(base)[index]);
    case DType::BF16: return bf16_to_float(static_cast<const uint16_t*>(base)[index]);
  }
  return 0.0f;
}

inline void store_from_float(void* base, std::size_t index, DType type, float value) {
  switch (type) {
    case DType::F32: static_cast<float*>(base)[index] = value; break;
    case DType::F16: static_cast<uint16_t*>(base)[index] = float_to_f16(value); break;
    case DType::BF16: static_cast<uint16_t*>(base)[index] = float_to_bf16(value); break;
  }
}

}  // namespace lk
