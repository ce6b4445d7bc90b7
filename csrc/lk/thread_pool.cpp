#include "lk/thread_pool.h"

#include <xmmintrin.h>

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

struct ThreadPool::Job {
  uint32_t ticket = 0;
  int nodes = 0;
  std::vector<Phase> phases;
  std::vector<uint32_t> totals;                        // tasks per phase, all nodes
  std::unique_ptr<std::atomic<uint32_t>[]> next;       // [phase * nodes + node]: next unclaimed task
  std::unique_ptr<std::atomic<uint32_t>[]> completed;  // [phase]: tasks done
};

ThreadPool::ThreadPool(const Topology& topology, int threads, ThreadBinding binding, bool power_saving)
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
  auto job = std::make_shared<Job>();
  job->nodes = num_nodes_;
  for (Phase& phase : phases) {
    if (static_cast<int>(phase.tasks_per_node.size()) != num_nodes_) {
      throw std::logic_error("phase task counts do not match the node count");
    }
    uint32_t total = 0;
    for (uint32_t count : phase.tasks_per_node) total += count;
    if (total == 0) continue;  // nothing to wait for
    job->totals.push_back(total);
    job->phases.push_back(std::move(phase));
  }
  job->ticket = ++launched_;
  if (job->phases.empty()) {
    finished_.store(job->ticket, std::memory_order_release);
    return job->ticket;
  }
  job->next = std::make_unique<std::atomic<uint32_t>[]>(job->phases.size() * num_nodes_);
  job->completed = std::make_unique<std::atomic<uint32_t>[]>(job->phases.size());
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
  // Kernels rely on IEEE denormals (the AVX2 FP8 decode builds weights as fp32 denormals),
  // and a thread starts with the floating-point modes of the thread that created it, which
  // may flush them (torch.set_flush_denormal): clear denormals-are-zero and flush-to-zero.
  constexpr unsigned kDenormalsAreZero = 0x0040, kFlushToZero = 0x8000;
  _mm_setcsr(_mm_getcsr() & ~(kDenormalsAreZero | kFlushToZero));
  uint32_t seen = 0;
  const auto spin = power_saving_ ? std::chrono::nanoseconds(0) : std::chrono::nanoseconds(kIdleSpin);
  while (true) {
    seen = wait_for_change(generation_, seen, spin);
    if (stopping_.load(std::memory_order_acquire)) return;
    std::shared_ptr<Job> job;
    {
      std::lock_guard<std::mutex> lock(job_mutex_);
      job = current_job_;
    }
    if (job) run_job(*job, worker);
  }
}

void ThreadPool::run_job(Job& job, int worker) {
  const int home = worker_node_[worker];
  for (std::size_t p = 0; p < job.phases.size(); ++p) {
    if (p > 0) {  // the previous phase's results must all be there
      auto& previous = job.completed[p - 1];
      uint32_t done = previous.load(std::memory_order_acquire);
      for (int spins = 0; done != job.totals[p - 1]; ++spins) {
        if (spins < kBarrierSpins) {
          cpu_relax();
        } else {
          previous.wait(done, std::memory_order_acquire);
        }
        done = previous.load(std::memory_order_acquire);
      }
    }
    const Phase& phase = job.phases[p];
    uint32_t mine = 0;
    for (int offset = 0; offset < job.nodes; ++offset) {
      const int node = (home + offset) % job.nodes;
      auto& next = job.next[p * job.nodes + node];
      const uint32_t count = phase.tasks_per_node[node];
      if (next.load(std::memory_order_relaxed) >= count) continue;
      for (uint32_t task = next.fetch_add(1, std::memory_order_relaxed); task < count;
           task = next.fetch_add(1, std::memory_order_relaxed)) {
        phase.run(node, task, worker);
        ++mine;
      }
    }
    if (mine == 0) continue;
    const uint32_t done = job.completed[p].fetch_add(mine, std::memory_order_acq_rel) + mine;
    if (done == job.totals[p]) {
      if (p + 1 == job.phases.size()) {
        finished_.store(job.ticket, std::memory_order_release);
        finished_.notify_all();
        return;
      }
      job.completed[p].notify_all();
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
