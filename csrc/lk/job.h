// A job: phases of tasks that run one after another, the tasks of a phase side by side on
// any number of threads. Each phase has a task count per NUMA node; a thread claims tasks of
// its own node first (atomic counters, so uneven tasks still keep everyone busy) and then
// helps other nodes, which also covers nodes that no thread calls home. A phase starts once
// every task of the previous one has completed: a thread that is late (preempted, still
// waking) delays nobody, the others take its share.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

namespace lk {

struct Phase {
  std::vector<uint32_t> tasks_per_node;
  std::function<void(int node, uint32_t task, int worker)> run;
};

class Job {
 public:
  // Phases without tasks are dropped. Throws std::logic_error when a phase's task counts
  // do not match `nodes`.
  Job(std::vector<Phase> phases, int nodes);

  bool empty() const { return phases_.empty(); }
  // True when every phase has one task: one thread runs it as fast as a team would.
  bool one_task_a_phase() const;
  // Runs tasks as thread `worker` (an index below the executor's thread count) whose home
  // is `home_node`, until no phase has a task left for it. True for the one call that
  // completed the job's last task.
  bool work(int worker, int home_node);

 private:
  void wait_for_phase(std::size_t phase) const;

  int nodes_;
  std::vector<Phase> phases_;
  std::vector<uint32_t> totals_;                        // tasks per phase, all nodes
  std::unique_ptr<std::atomic<uint32_t>[]> next_;       // [phase * nodes + node]: next unclaimed task
  std::unique_ptr<std::atomic<uint32_t>[]> completed_;  // [phase]: tasks done
};

// Floating-point modes the kernels need on the thread that runs them, restored afterwards.
// The kernels rely on IEEE denormals (the AVX2 FP8 unpack builds weights as fp32
// denormals), and a thread may flush them (torch.set_flush_denormal sets DAZ and FTZ).
class KernelFloatModes {
 public:
  KernelFloatModes();
  ~KernelFloatModes();
  KernelFloatModes(const KernelFloatModes&) = delete;
  KernelFloatModes& operator=(const KernelFloatModes&) = delete;

 private:
  unsigned saved_;
};

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

}  // namespace lk
