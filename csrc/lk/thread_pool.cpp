#include "lk/thread_pool.h"

#include <pthread.h>
#include <sched.h>

#include <chrono>
#include <sstream>
#include <stdexcept>

namespace lk {
namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// How long an idle worker polls for the next job before sleeping when power saving is
// off: long enough to cover the gap between two MoE layers of one forward, short enough
// to give the cores back to the host's own threads soon after.
constexpr auto kIdleSpin = std::chrono::microseconds(100);
// Barrier waits inside a job are short; spin this many times before sleeping.
constexpr int kBarrierSpins = 20000;

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
      if (++polls % 64 == 0 && std::chrono::steady_clock::now() > deadline) break;
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

ThreadPool::ThreadPool(const Topology& topology, int threads, ThreadBinding binding,
                       bool power_saving)
    : num_nodes_(topology.num_nodes()), power_saving_(power_saving), binding_(binding) {
  if (threads < 1) throw std::invalid_argument("thread count must be >= 1");
  if (num_nodes_ < 1) throw std::invalid_argument("topology has no NUMA node");
  auto placement = place_workers(topology, threads, binding);
  worker_node_.reserve(placement.size());
  for (const auto& [node, cpus] : placement) worker_node_.push_back(node);
  workers_.reserve(placement.size());
  for (std::size_t worker = 0; worker < placement.size(); ++worker) {
    workers_.emplace_back(&ThreadPool::worker_main, this, static_cast<int>(worker),
                          std::move(placement[worker].second));
  }
}

ThreadPool::~ThreadPool() {
  wait_idle();
  stopping_.store(true, std::memory_order_release);
  generation_.fetch_add(1, std::memory_order_acq_rel);
  generation_.notify_all();
  for (auto& thread : workers_) thread.join();
}

uint32_t ThreadPool::launch(std::vector<Phase> phases) {
  wait_idle();
  for (const Phase& phase : phases) {
    if (static_cast<int>(phase.tasks_per_node.size()) != num_nodes_) {
      throw std::logic_error("phase task counts do not match the node count");
    }
  }
  const std::size_t counters = phases.size() * num_nodes_;
  if (counters > counters_capacity_ || phases.size() > counters_capacity_) {
    counters_capacity_ = std::max(counters, phases.size());
    next_task_ = std::make_unique<std::atomic<uint32_t>[]>(counters_capacity_);
    arrived_ = std::make_unique<std::atomic<uint32_t>[]>(counters_capacity_);
  }
  for (std::size_t i = 0; i < counters; ++i) next_task_[i].store(0, std::memory_order_relaxed);
  for (std::size_t i = 0; i < phases.size(); ++i) arrived_[i].store(0, std::memory_order_relaxed);
  phases_ = std::move(phases);
  if (phases_.empty()) return generation_.load(std::memory_order_acquire);
  const uint32_t ticket = generation_.fetch_add(1, std::memory_order_acq_rel) + 1;  // publishes the job
  generation_.notify_all();
  return ticket;
}

void ThreadPool::wait(uint32_t ticket) {
  // Tickets wrap around: compare by signed distance.
  auto pending = [&](uint32_t finished) { return static_cast<int32_t>(finished - ticket) < 0; };
  uint32_t finished = finished_generation_.load(std::memory_order_acquire);
  // The caller usually shares its cores with the workers: poll briefly, then sleep.
  for (int i = 0; i < 64 && pending(finished); ++i) {
    cpu_relax();
    finished = finished_generation_.load(std::memory_order_acquire);
  }
  while (pending(finished)) {
    finished_generation_.wait(finished, std::memory_order_acquire);
    finished = finished_generation_.load(std::memory_order_acquire);
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
  uint32_t seen = 0;
  const auto spin = power_saving_ ? std::chrono::nanoseconds(0)
                                  : std::chrono::nanoseconds(kIdleSpin);
  while (true) {
    seen = wait_for_change(generation_, seen, spin);
    if (stopping_.load(std::memory_order_acquire)) return;
    run_current_job(worker);
  }
}

void ThreadPool::run_current_job(int worker) {
  const int home = worker_node_[worker];
  const uint32_t threads = static_cast<uint32_t>(workers_.size());
  for (std::size_t p = 0; p < phases_.size(); ++p) {
    const Phase& phase = phases_[p];
    for (int offset = 0; offset < num_nodes_; ++offset) {
      const int node = (home + offset) % num_nodes_;
      auto& next = next_task_[p * num_nodes_ + node];
      const uint32_t count = phase.tasks_per_node[node];
      for (uint32_t task = next.fetch_add(1, std::memory_order_relaxed); task < count;
           task = next.fetch_add(1, std::memory_order_relaxed)) {
        phase.run(node, task, worker);
      }
    }
    auto& arrived = arrived_[p];
    const uint32_t position = arrived.fetch_add(1, std::memory_order_acq_rel) + 1;
    if (p + 1 == phases_.size()) {
      if (position == threads) {
        finished_generation_.store(generation_.load(std::memory_order_acquire),
                                   std::memory_order_release);
        finished_generation_.notify_all();
      }
      return;
    }
    if (position == threads) {
      arrived.notify_all();
      continue;
    }
    uint32_t seen = position;
    for (int spins = 0; seen != threads; ++spins) {
      if (spins < kBarrierSpins) {
        cpu_relax();
        seen = arrived.load(std::memory_order_acquire);
      } else {
        arrived.wait(seen, std::memory_order_acquire);
        seen = arrived.load(std::memory_order_acquire);
      }
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
