#include "lk/job.h"

#include <xmmintrin.h>

#include <stdexcept>

namespace lk {
namespace {

// Barrier waits inside a job are short; spin this many times before sleeping.
constexpr int kBarrierSpins = 20000;

}  // namespace

Job::Job(std::vector<Phase> phases, int nodes) : nodes_(nodes) {
  for (Phase& phase : phases) {
    if (static_cast<int>(phase.tasks_per_node.size()) != nodes_) {
      throw std::logic_error("phase task counts do not match the node count");
    }
    uint32_t total = 0;
    for (uint32_t count : phase.tasks_per_node) total += count;
    if (total == 0) continue;  // nothing to wait for
    totals_.push_back(total);
    phases_.push_back(std::move(phase));
  }
  next_ = std::make_unique<std::atomic<uint32_t>[]>(phases_.size() * nodes_);
  completed_ = std::make_unique<std::atomic<uint32_t>[]>(phases_.size());
}

bool Job::one_task_a_phase() const {
  for (uint32_t total : totals_) {
    if (total > 1) return false;
  }
  return true;
}

void Job::wait_for_phase(std::size_t phase) const {
  auto& completed = completed_[phase];
  uint32_t done = completed.load(std::memory_order_acquire);
  for (int spins = 0; done != totals_[phase]; ++spins) {
    if (spins < kBarrierSpins) {
      cpu_relax();
    } else {
      completed.wait(done, std::memory_order_acquire);
    }
    done = completed.load(std::memory_order_acquire);
  }
}

bool Job::work(int worker, int home_node) {
  for (std::size_t p = 0; p < phases_.size(); ++p) {
    if (p > 0) wait_for_phase(p - 1);  // the previous phase's results must all be there
    const Phase& phase = phases_[p];
    uint32_t mine = 0;
    for (int offset = 0; offset < nodes_; ++offset) {
      const int node = (home_node + offset) % nodes_;
      auto& next = next_[p * nodes_ + node];
      const uint32_t count = phase.tasks_per_node[node];
      if (next.load(std::memory_order_relaxed) >= count) continue;
      for (uint32_t task = next.fetch_add(1, std::memory_order_relaxed); task < count;
           task = next.fetch_add(1, std::memory_order_relaxed)) {
        phase.run(node, task, worker);
        ++mine;
      }
    }
    if (mine == 0) continue;
    const uint32_t done = completed_[p].fetch_add(mine, std::memory_order_acq_rel) + mine;
    if (done == totals_[p]) {
      if (p + 1 == phases_.size()) return true;
      completed_[p].notify_all();
    }
  }
  return false;
}

namespace {
constexpr unsigned kDenormalsAreZero = 0x0040, kFlushToZero = 0x8000;
}  // namespace

KernelFloatModes::KernelFloatModes() : saved_(_mm_getcsr()) {
  _mm_setcsr(saved_ & ~(kDenormalsAreZero | kFlushToZero));
}

KernelFloatModes::~KernelFloatModes() { _mm_setcsr(saved_); }

}  // namespace lk
