// What all MoE engines of a process share: the topology, one executor (lk's own worker pool
// or the caller's OpenMP team), the kernels chosen for this CPU, and the scratch memory of
// the job in flight (one job runs at a time).
#pragma once

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "lk/cpu_features.h"
#include "lk/host_buffer.h"
#include "lk/kernels/kernels.h"
#include "lk/executor.h"
#include "lk/thread_pool.h"
#include "lk/topology.h"

namespace lk {

// Whose threads run the jobs: lk's own pool, or the OpenMP team of the submitting thread.
enum class Workers : int { OwnPool = 0, OpenMpTeam = 1 };

struct RuntimeOptions {
  int threads = 1;
  Workers workers = Workers::OwnPool;
  ThreadBinding binding = ThreadBinding::CpuCore;
  bool power_saving = false;
  std::string isa;       // "" = best the CPU supports; otherwise a level no higher than that
  int virtual_nodes = 0;  // 0 = the machine's real NUMA nodes
};

class Runtime {
 public:
  explicit Runtime(const RuntimeOptions& options);

  Executor& executor() { return *executor_; }
  const Topology& topology() const { return topology_; }
  const kernels::KernelSet& kernels() const { return kernels_; }
  Isa isa() const { return kernels_.isa; }
  Workers workers() const { return workers_; }
  std::string describe() const;

  // Scratch of the running job, shared by every engine of the runtime so that it does not
  // grow with the layer count. Only touched between executor().wait() and the next launch,
  // or by the job itself.
  struct Scratch {
    HostBuffer input;               // fp32 copy of the hidden states
    HostBuffer input_q;             // the hidden states quantized for integer kernels
    std::vector<HostBuffer> hidden;    // per node: activated intermediate rows, one per slot
    std::vector<HostBuffer> hidden_q;  // per node: the same rows quantized for integer kernels
    std::vector<HostBuffer> staged_hidden;  // per node: chunks of those rows staged for unit kernels
    std::vector<HostBuffer> partial;   // per node: partial outputs, one row per token
    HostBuffer per_worker;             // widened panels, gate/up sums and staged rows, per worker
  };
  Scratch& scratch() { return scratch_; }
  // Held while a job is prepared and launched, so callers on several threads do not
  // overwrite each other's scratch.
  std::mutex& submit_mutex() { return submit_mutex_; }

 private:
  std::mutex submit_mutex_;
  Topology topology_;
  Workers workers_;
  const kernels::KernelSet& kernels_;
  std::unique_ptr<Executor> executor_;
  Scratch scratch_;
};

}  // namespace lk
