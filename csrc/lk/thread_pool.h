// lk's own worker threads, bound to cores or NUMA nodes, that run one job at a time while
// the thread that launched it goes on (the GPU path starts jobs from stream callbacks and
// collects them later).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "lk/executor.h"
#include "lk/topology.h"

namespace lk {

enum class ThreadBinding : int { CpuCore = 0, NumaNode = 1, None = 2 };

class ThreadPool final : public Executor {
 public:
  // Throws std::system_error when a worker thread cannot be created (after joining the
  // ones already started).
  ThreadPool(const Topology& topology, int threads, ThreadBinding binding, bool power_saving);
  ~ThreadPool() override;
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // Returns at once: the workers run the job.
  uint32_t launch(std::vector<Phase> phases) override;
  void wait(uint32_t ticket) override;
  int num_threads() const override { return static_cast<int>(workers_.size()); }
  std::string describe() const override;

 protected:
  uint32_t last_launched() const override { return launched_; }

 private:
  struct Running {
    uint32_t ticket;
    Job job;
  };
  void worker_main(int worker, std::vector<int> allowed_cpus);
  void stop_workers();

  int num_nodes_;
  bool power_saving_;
  ThreadBinding binding_;
  std::vector<int> worker_node_;

  std::mutex job_mutex_;                 // guards current_job_
  std::shared_ptr<Running> current_job_;  // workers keep their own reference while they run it
  uint32_t launched_ = 0;            // ticket of the last launched job (launching thread only)
  std::atomic<uint32_t> generation_{0};  // bumped to wake the workers
  std::atomic<uint32_t> finished_{0};    // ticket of the last finished job
  std::atomic<bool> stopping_{false};
  std::vector<std::thread> workers_;
};

}  // namespace lk
