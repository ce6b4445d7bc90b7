// Persistent worker threads that run one job at a time. A job is a sequence of phases; each
// phase has a task count per NUMA node. Workers claim tasks of their own node first (atomic
// counters, so uneven tasks still keep everyone busy) and then help other nodes, which also
// covers nodes that have no worker at all. A phase starts once every task of the previous
// one has completed: a worker that is late (preempted, still waking) delays nobody, the
// others take its share.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "lk/topology.h"

namespace lk {

enum class ThreadBinding : int { CpuCore = 0, NumaNode = 1, None = 2 };

struct Phase {
  std::vector<uint32_t> tasks_per_node;
  std::function<void(int node, uint32_t task, int worker)> run;
};

class ThreadPool {
 public:
  ThreadPool(const Topology& topology, int threads, ThreadBinding binding, bool power_saving);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // Starts `phases` on the workers and returns at once with the job's ticket. A job still
  // running is waited for first, so jobs run in launch order.
  uint32_t launch(std::vector<Phase> phases);
  // Blocks until the job with `ticket` (and so every earlier one) has finished.
  void wait(uint32_t ticket);
  // Blocks until no job is running.
  void wait_idle() { wait(launched_); }
  // Runs a job and waits for it.
  void run(std::vector<Phase> phases) { wait(launch(std::move(phases))); }

  int num_threads() const { return static_cast<int>(workers_.size()); }
  std::string describe() const;

 private:
  struct Job;
  void worker_main(int worker, std::vector<int> allowed_cpus);
  void run_job(Job& job, int worker);

  int num_nodes_;
  bool power_saving_;
  ThreadBinding binding_;
  std::vector<int> worker_node_;

  std::mutex job_mutex_;             // guards current_job_
  std::shared_ptr<Job> current_job_;  // workers keep their own reference while they run it
  uint32_t launched_ = 0;            // ticket of the last launched job (launching thread only)
  std::atomic<uint32_t> generation_{0};  // bumped to wake the workers
  std::atomic<uint32_t> finished_{0};    // ticket of the last finished job
  std::atomic<bool> stopping_{false};
  std::vector<std::thread> workers_;
};

}  // namespace lk
