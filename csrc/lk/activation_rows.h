// Activation rows quantized once per forward for the integer kernels.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <numeric>

#include "lk/common.h"
#include "lk/formats.h"
#include "lk/job_planning.h"
#include "lk/kernels/kernels.h"

namespace lk {

// Activation rows quantized for the integer kernels (kernels::ActivationRow), one record
// per row: int16 values, zero up to a multiple of 16; for 8-bit formats the same values as
// bytes in quad order; per group its scale and its exact fp32 sum; for 8-bit formats each
// span's sum of the values times the format's quad bias. Every ISA reads the same records,
// so they all multiply the same integers.
class QuantizedRows {
 public:
  QuantizedRows() = default;  // no rows: for formats whose kernels read fp32 rows
  QuantizedRows(WeightFormat format, int depth, int group)
      : largest_(kernels::activation_max(format)), bias_(kernels::quad_bias(format)), bytes_(largest_ <= 127),
        depth_(depth), group_(group), groups_(static_cast<int>(panel_groups(depth, group))),
        spans_(groups_ * kernels::spans_per_group(group)), stride_(static_cast<int>(round_up(depth, 16))) {}

  std::size_t bytes(std::size_t rows) const { return rows * record_bytes(); }

  int groups() const { return groups_; }

  void quantize(const float* x, void* records, std::size_t row) const {
    for (int g = 0; g < groups_; ++g) quantize_group(x, records, row, g);
  }

  // Group g of the row; the last group also zeroes the padding after it.
  void quantize_group(const float* x, void* records, std::size_t row, int g) const {
    const Record record = at(records, row);
    const int begin = g * group_, end = std::min(depth_, begin + group_);
    // Eight lanes of maxima and sums, then the lanes in order (the same total on every
    // machine), so that no single chain of dependent operations bounds the loop.
    constexpr int kLanes = 8;
    float lane_largest[kLanes] = {}, lane_total[kLanes] = {};
    int k = begin;
    for (; k + kLanes <= end; k += kLanes) {
      for (int i = 0; i < kLanes; ++i) {
        lane_largest[i] = std::max(lane_largest[i], std::fabs(x[k + i]));
        lane_total[i] += x[k + i];
      }
    }
    float largest = 0.0f, total = 0.0f;
    for (int i = 0; i < kLanes; ++i) {
      largest = std::max(largest, lane_largest[i]);
      total += lane_total[i];
    }
    for (; k < end; ++k) {
      largest = std::max(largest, std::fabs(x[k]));
      total += x[k];
    }
    // A NaN or infinity makes the group's total non-finite; its scale then carries a NaN
    // into the outputs, as the fp32 kernels would.
    const bool finite = std::isfinite(total);
    const float inverse = finite && largest > 0.0f ? largest_ / largest : 0.0f;
    record.scale[g] = finite ? largest / largest_ : std::numeric_limits<float>::quiet_NaN();
    record.sum[g] = total;
    int16_t* q = record.q;
    for (k = begin; k < end; ++k) q[k] = finite ? static_cast<int16_t>(round_to_integer(x[k] * inverse)) : 0;
    const int padded_end = g == groups_ - 1 ? stride_ : end;
    std::fill(q + end, q + padded_end, int16_t{0});
    if (!bytes_) return;
    // Groups are multiples of 16 inputs, so a group holds whole quads.
    for (int k = begin; k < padded_end; ++k) record.quads[(k & ~3) + kInt4QuadOrder[k & 3]] = static_cast<int8_t>(q[k]);
    for (int first = begin; first < end; first += kernels::kIntegerSpan) {
      const int last = std::min(end, first + kernels::kIntegerSpan);
      record.span_corrections[kernels::span_index(group_, g, first - begin)] =
          -bias_ * std::accumulate(q + first, q + last, int32_t{0});
    }
  }

  kernels::ActivationRow row(const float* x, const void* records, std::size_t row) const {
    const Record record = at(records, row);
    return {.values = x,
            .q = record.q,
            .scale = record.scale,
            .sum = record.sum,
            .quads = record.quads,
            .span_corrections = record.span_corrections};
  }

 private:
  struct Record {
    int16_t* q;
    int8_t* quads;
    float* scale;
    float* sum;
    int32_t* span_corrections;
  };

  std::size_t record_bytes() const {
    return stride_ * sizeof(int16_t) + 2 * groups_ * sizeof(float) +
           (bytes_ ? stride_ * sizeof(int8_t) + spans_ * sizeof(int32_t) : 0);
  }
  Record at(const void* records, std::size_t row) const {
    char* base = static_cast<char*>(const_cast<void*>(records)) + row * record_bytes();
    Record record{};
    record.q = reinterpret_cast<int16_t*>(base);
    record.scale = reinterpret_cast<float*>(base + stride_ * sizeof(int16_t));
    record.sum = record.scale + groups_;
    if (bytes_) {
      record.span_corrections = reinterpret_cast<int32_t*>(record.sum + groups_);
      record.quads = reinterpret_cast<int8_t*>(record.span_corrections + spans_);
    }
    return record;
  }

  int largest_ = 0, bias_ = 0;
  bool bytes_ = false;
  int depth_ = 0, group_ = 0, groups_ = 0, spans_ = 0, stride_ = 0;
};

}  // namespace lk
