#include <algorithm>

#include "lk/kernels/kernels.h"

namespace lk::kernels {

void multiply_panel(const KernelSet& kernels, WeightFormat format, const void* panel, int depth, int group,
                    const ActivationRow* a_rows, int count, float* const* c_rows, bool accumulate, void* widened,
                    const void* staged) {
  const FormatKernels& kernel = kernels[format];
  if (staged != nullptr) {
    kernel.unit_gemm(a_rows, staged, count, panel, depth, group, c_rows, accumulate, widened);
    return;
  }
  // Grouped formats widen whole groups; a group deeper than a block is multiplied unwidened.
  const int block = !is_grouped(format) ? kernel.widen_block : kernel.widen_block / group * group;
  if (kernel.widen == nullptr || count < kernel.widen_rows || block == 0) {
    kernel.gemm(a_rows, count, panel, depth, group, c_rows, accumulate);
    return;
  }
  ActivationRow block_rows[kMaxPanelRows];
  for (int first = 0; first < depth; first += block) {
    const int rows = std::min(block, depth - first);
    kernel.widen(panel, depth, group, first, rows, widened);
    const int first_group = is_grouped(format) ? first / group : 0;
    const int first_span = is_grouped(format) ? span_index(group, first_group, 0) : 0;
    for (int i = 0; i < count; ++i) {
      const ActivationRow& a = a_rows[i];
      block_rows[i] = {.values = a.values + first,
                       .q = a.q ? a.q + first : nullptr,
                       .scale = a.scale ? a.scale + first_group : nullptr,
                       .sum = a.sum ? a.sum + first_group : nullptr,
                       .quads = a.quads ? a.quads + first : nullptr,
                       .span_corrections = a.span_corrections ? a.span_corrections + first_span : nullptr};
    }
    kernel.widened_gemm(block_rows, count, widened, rows, group, c_rows, accumulate || first > 0);
  }
}

const void* stage_for_unit(const FormatKernels& kernels, const ActivationRow* a_rows, int count, int depth,
                           void* buffer) {
  if (!unit_takes(kernels, count)) return nullptr;
  kernels.stage_rows(a_rows, count, depth, buffer);
  return buffer;
}

void multiply_two_panels(const KernelSet& kernels, WeightFormat format, const void* first, const void* second,
                         int depth, int group, const ActivationRow* a_rows, int count, float* const* first_rows,
                         float* const* second_rows, bool accumulate, void* widened, const void* staged) {
  const FormatKernels& kernel = kernels[format];
  if (staged != nullptr) {
    kernel.unit_gemm_pair(a_rows, staged, count, first, second, depth, group, first_rows, second_rows, accumulate,
                            widened);
    return;
  }
  if (count <= kernel.pair_rows) {
    kernel.gemm_pair(a_rows, count, first, second, depth, group, first_rows, second_rows, accumulate);
    return;
  }
  multiply_panel(kernels, format, first, depth, group, a_rows, count, first_rows, accumulate, widened);
  multiply_panel(kernels, format, second, depth, group, a_rows, count, second_rows, accumulate, widened);
}

}  // namespace lk::kernels
