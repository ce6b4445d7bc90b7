#include "lk/openmp_team.h"

#include <dlfcn.h>
#include <sched.h>

#include <sstream>
#include <stdexcept>

namespace lk {

struct OpenMpTeam::Entry {
  const OpenMpTeam* team;
  Job* job;
};

OpenMpTeam::OpenMpTeam(const Topology& topology, int threads)
    : num_nodes_(topology.num_nodes()), threads_(threads) {
  if (threads < 1) throw std::invalid_argument("thread count must be >= 1");
  if (num_nodes_ < 1) throw std::invalid_argument("topology has no NUMA node");
  parallel_ = reinterpret_cast<ParallelFn>(dlsym(RTLD_DEFAULT, "GOMP_parallel"));
  thread_num_ = reinterpret_cast<ThreadNumFn>(dlsym(RTLD_DEFAULT, "omp_get_thread_num"));
  if (parallel_ == nullptr || thread_num_ == nullptr) {
    throw std::runtime_error(
        "no OpenMP runtime is loaded in this process (GOMP_parallel and omp_get_thread_num not found): "
        "import torch first, or let lk use its own worker threads");
  }
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(parallel_), &info) != 0 && info.dli_fname != nullptr) {
    runtime_library_ = info.dli_fname;
  }
  for (int node = 0; node < num_nodes_; ++node) {
    for (int cpu : topology.node_cpus[node]) {
      if (cpu >= static_cast<int>(cpu_node_.size())) cpu_node_.resize(cpu + 1, -1);
      cpu_node_[cpu] = node;
    }
  }
}

int OpenMpTeam::home_node() const {
  const int cpu = sched_getcpu();
  if (cpu < 0 || cpu >= static_cast<int>(cpu_node_.size()) || cpu_node_[cpu] < 0) return 0;
  return cpu_node_[cpu];
}

void OpenMpTeam::run_member(void* data) {
  const Entry& entry = *static_cast<const Entry*>(data);
  const KernelFloatModes float_modes;
  entry.job->work(entry.team->thread_num_(), entry.team->home_node());
}

uint32_t OpenMpTeam::launch(std::vector<Phase> phases) {
  Job job(std::move(phases), num_nodes_);
  if (job.one_task_a_phase()) {
    // A router's or a tiny layer's job: waking the team would cost more than the task.
    const KernelFloatModes float_modes;
    job.work(0, home_node());
  } else {
    Entry entry{this, &job};
    parallel_(&OpenMpTeam::run_member, &entry, static_cast<unsigned>(threads_), 0);
  }
  return ++launched_;
}

std::string OpenMpTeam::describe() const {
  std::ostringstream out;
  out << threads_ << " thread(s) of the caller's OpenMP team";
  if (!runtime_library_.empty()) out << " (" << runtime_library_ << ")";
  return out.str();
}

}  // namespace lk
