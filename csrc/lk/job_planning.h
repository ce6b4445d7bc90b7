// How the engines cut a forward into tasks (lk/job.h): rows per kernel call, panels per
// task, tasks per node.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "lk/kernels/kernels.h"

namespace lk {

// Most rows handed to one kernel call (a format's kernels take chunk_rows); bounds the
// per-worker sum and staging buffers.
constexpr int kMaxChunkRows = kernels::kMaxPanelRows;
// Tokens per task when converting the input and combining the nodes' outputs.
constexpr int kTokenBlock = 16;
// A task walks up to this many consecutive panels, which lie next to each other: a thread
// then streams long runs instead of single panels interleaved with the other threads'.
// Runs shrink until every thread has at least kTasksPerThread tasks, so dynamic claiming
// still evens out the end of a phase.
constexpr int kRunPanels = 8;
constexpr std::size_t kTasksPerThread = 8;

// Panels per task when `panels` are split into runs of at most `longest` for `threads`
// threads.
inline int run_length(std::size_t tasks_at_one_panel, int panels, int threads, int longest = kRunPanels) {
  const std::size_t fit = tasks_at_one_panel / (kTasksPerThread * static_cast<std::size_t>(threads));
  return static_cast<int>(std::clamp<std::size_t>(fit, 1, std::max(1, std::min(longest, panels))));
}

inline std::size_t round_up(std::size_t value, std::size_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// Splits `count` tasks that may run anywhere evenly over the nodes.
inline std::vector<uint32_t> spread(uint32_t count, int nodes) {
  std::vector<uint32_t> per_node(nodes);
  for (int n = 0; n < nodes; ++n) per_node[n] = count * (n + 1ull) / nodes - count * 1ull * n / nodes;
  return per_node;
}

inline uint32_t spread_offset(uint32_t count, int nodes, int node) {
  return static_cast<uint32_t>(count * 1ull * node / nodes);
}

}  // namespace lk
