#include "lk/thread_pool.h"

#include <pthread.h>
#include <sched.h>

#include <chrono>
#include <sstream>
#include <stdexcept>

namespace lk {
namespace {

// How long an idle worker polls for the next job before sleeping when power saving is
// off: long enough to cover the gap between two MoE layers of one forward, short enough
// to give the cores back to the host's own threads soon after.
constexpr auto kIdleSpin = std::chrono::microseconds(100);

// Waits until `value` differs from `old`, spinning up to `spin` first.
uint32_t wait_for_change(const std::atomic<uint32_t>& value, uint32_t old,
                         std::chrono::nanoseconds spin) {
  uint32_t now = value.load(std::memory_order_acquire);
  if (now != old) return now;
  if (spin.count() > 0) {
    const auto deadline = std::chrono::steady_clock::now() + spin;
    int polls = 0;
    while (true) {
      cpu_relax();
      now = value.load(std::memory_order_acquire);
      if (now != old) return now;
      if (++polls % 64 != 0) continue;
      if (std::chrono::steady_clock::now() > deadline) break;
      // The thread that submits the next job (or the host's own threads) may be waiting
      // for this core: a spinning worker must not hold it until the scheduler preempts it.
      sched_yield();
    }
  }
  while ((now = value.load(std::memory_order_acquire)) == old) value.wait(old, std::memory_order_acquire);
  return now;
}

// Spreads `threads` over the nodes in proportion to their cores (at least one per node
// while threads last) and gives each worker the CPUs it may run on.
std::vector<std::pair<int, std::vector<int>>> place_workers(const Topology& topology, int threads,
                                                            ThreadBinding binding) {
  const int nodes = topology.num_nodes();
  const int total_cpus = std::max(1, topology.num_cpus());
  std::vector<int> per_node(nodes, 0);
  int placed = 0;
  for (int node = 0; node < nodes; ++node) {
    per_node[node] = static_cast<int>(static_cast<long long>(threads) *
                                      static_cast<long long>(topology.node_cpus[node].size()) /
                                      total_cpus);
    placed += per_node[node];
  }
  // A virtual node without cores gets no worker: the others take its tasks.
  for (int node = 0; placed < threads; node = (node + 1) % nodes) {
    if (!topology.node_cpus[node].empty()) {
      ++per_node[node];
      ++placed;
    }
  }
  std::vector<std::pair<int, std::vector<int>>> workers;
  for (int node = 0; node < nodes; ++node) {
    const auto& cpus = topology.node_cpus[node];
    for (int index = 0; index < per_node[node]; ++index) {
      std::vector<int> allowed;
      if (binding == ThreadBinding::CpuCore && !cpus.empty()) {
        allowed.push_back(cpus[index % cpus.size()]);
      } else if (binding == ThreadBinding::NumaNode) {
        allowed = cpus;
      }
      workers.emplace_back(node, std::move(allowed));
    }
  }
  return workers;
}

}  // namespace

ThreadPool::ThreadPool(const Topology& topology, int threads, ThreadBinding binding, bool power_saving)
    : num_nodes_(topology.num_nodes()), power_saving_(power_saving), binding_(binding) {
  if (threads < 1) throw std::invalid_argument("thread count must be >= 1");
  if (num_nodes_ < 1) throw std::invalid_argument("topology has no NUMA node");
  auto placement = place_workers(topology, threads, binding);
  worker_node_.reserve(placement.size());
  for (const auto& [node, cpus] : placement) worker_node_.push_back(node);
  workers_.reserve(placement.size());
  try {
    for (std::size_t worker = 0; worker < placement.size(); ++worker) {
      workers_.emplace_back(&ThreadPool::worker_main, this, static_cast<int>(worker),
                            std::move(placement[worker].second));
    }
  } catch (...) {
    stop_workers();
    throw;
  }
}

ThreadPool::~ThreadPool() {
  wait_idle();
  stop_workers();
}

void ThreadPool::stop_workers() {
  stopping_.store(true, std::memory_order_release);
  generation_.fetch_add(1, std::memory_order_acq_rel);
  generation_.notify_all();
  for (auto& thread : workers_) thread.join();
  workers_.clear();
}

uint32_t ThreadPool::launch(std::vector<Phase> phases) {
  wait_idle();
  auto job = std::make_shared<Running>(Running{launched_ + 1, Job(std::move(phases), num_nodes_)});
  launched_ = job->ticket;
  if (job->job.empty()) {
    finished_.store(job->ticket, std::memory_order_release);
    return job->ticket;
  }
  {
    std::lock_guard<std::mutex> lock(job_mutex_);
    current_job_ = std::move(job);
  }
  generation_.fetch_add(1, std::memory_order_acq_rel);
  generation_.notify_all();
  return launched_;
}

void ThreadPool::wait(uint32_t ticket) {
  // Tickets wrap around: compare by signed distance.
  auto pending = [&](uint32_t finished) { return static_cast<int32_t>(finished - ticket) < 0; };
  uint32_t finished = finished_.load(std::memory_order_acquire);
  // The caller usually shares its cores with the workers: poll briefly, then sleep.
  for (int i = 0; i < 64 && pending(finished); ++i) {
    cpu_relax();
    finished = finished_.load(std::memory_order_acquire);
  }
  while (pending(finished)) {
    finished_.wait(finished, std::memory_order_acquire);
    finished = finished_.load(std::memory_order_acquire);
  }
}

void ThreadPool::worker_main(int worker, std::vector<int> allowed_cpus) {
  if (!allowed_cpus.empty()) {
    cpu_set_t mask;
    CPU_ZERO(&mask);
    for (int cpu : allowed_cpus) CPU_SET(cpu, &mask);
    // A refused binding (e.g. a cpuset changed under us) only costs locality.
    pthread_setaffinity_np(pthread_self(), sizeof mask, &mask);
  }
  const KernelFloatModes float_modes;
  const int home = worker_node_[worker];
  uint32_t seen = 0;
  const auto spin = power_saving_ ? std::chrono::nanoseconds(0) : std::chrono::nanoseconds(kIdleSpin);
  while (true) {
    seen = wait_for_change(generation_, seen, spin);
    if (stopping_.load(std::memory_order_acquire)) return;
    std::shared_ptr<Running> running;
    {
      std::lock_guard<std::mutex> lock(job_mutex_);
      running = current_job_;
    }
    if (running && running->job.work(worker, home)) {
      finished_.store(running->ticket, std::memory_order_release);
      finished_.notify_all();
    }
  }
}

std::string ThreadPool::describe() const {
  std::ostringstream out;
  out << workers_.size() << " thread(s) over " << num_nodes_ << " node(s), binding "
      << (binding_ == ThreadBinding::CpuCore ? "CPU_CORE"
          : binding_ == ThreadBinding::NumaNode ? "NUMA_NODE" : "NONE")
      << (power_saving_ ? ", power saving" : "");
  return out.str();
}

}  // namespace lk
