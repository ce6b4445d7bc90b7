// Runs each job on the OpenMP team of the thread that launches it, through the OpenMP
// runtime already loaded in the process (torch's; vLLM's CPU worker binds that team's
// threads one per core). lk then uses the very threads vLLM's own kernels use, one after the
// other, instead of a second set of threads competing with them for the same cores.
//
// The runtime is found at run time (GCC's GOMP entry points, which libgomp and Intel's
// libiomp5 both export), so the module links no OpenMP library of its own: a second copy
// would bring a second team.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "lk/executor.h"
#include "lk/topology.h"

namespace lk {

class OpenMpTeam final : public Executor {
 public:
  // Throws std::runtime_error when the process has no OpenMP runtime loaded.
  OpenMpTeam(const Topology& topology, int threads);

  // Runs the job before returning: on the team, or on the calling thread alone where every
  // phase has one task (Job::one_task_a_phase).
  uint32_t launch(std::vector<Phase> phases) override;
  void wait(uint32_t) override {}
  int num_threads() const override { return threads_; }
  std::string describe() const override;

 protected:
  uint32_t last_launched() const override { return launched_; }

 private:
  struct Entry;
  static void run_member(void* data);
  int home_node() const;

  using ParallelFn = void (*)(void (*)(void*), void*, unsigned, unsigned);
  using ThreadNumFn = int (*)();
  ParallelFn parallel_ = nullptr;
  ThreadNumFn thread_num_ = nullptr;
  std::string runtime_library_;
  std::vector<int> cpu_node_;  // node of each CPU id, -1 for CPUs outside the topology
  int num_nodes_;
  int threads_;
  uint32_t launched_ = 0;
};

}  // namespace lk
