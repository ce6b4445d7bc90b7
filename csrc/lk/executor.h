// What runs the engine's jobs (lk/job.h): lk's own worker threads (ThreadPool), or the
// OpenMP team of the thread that submits (OpenMpTeam), so that lk and the host's OpenMP
// kernels take turns on the same threads instead of two sets of threads fighting for cores.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "lk/job.h"

namespace lk {

class Executor {
 public:
  virtual ~Executor() = default;

  // Starts `phases` and returns the job's ticket, at once where the executor runs jobs
  // asynchronously, after the job where it runs them on the calling thread. A job still
  // running is waited for first, so jobs run in launch order.
  virtual uint32_t launch(std::vector<Phase> phases) = 0;
  // Blocks until the job with `ticket` (and so every earlier one) has finished.
  virtual void wait(uint32_t ticket) = 0;
  // Most threads a job runs on: the worker indices tasks see are below it.
  virtual int num_threads() const = 0;
  virtual std::string describe() const = 0;

  // Blocks until no job is running.
  void wait_idle() { wait(last_launched()); }
  // Runs a job and waits for it.
  void run(std::vector<Phase> phases) { wait(launch(std::move(phases))); }

 protected:
  virtual uint32_t last_launched() const = 0;
};

}  // namespace lk
