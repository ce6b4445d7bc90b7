// Roofline probes: what this machine's cores and memory can do at most, measured with the
// same number of threads the lk engine uses, so kernel timings can be quoted as a fraction
// of a ceiling measured in the same run: on a shared machine absolute figures move between
// runs, ratios within one run much less.
//
// Both probes need AVX2 + FMA (the lk floor); on a CPU without them they throw
// std::runtime_error instead of executing an illegal instruction.
#pragma once

#include <cstddef>

namespace lk::bench {

// Multi-threaded read bandwidth in GB/s (1e9 bytes/s), best of `reps`. `threads` <= 0 means
// one per CPU in this process's affinity mask. Thread i is pinned to the i-th CPU of
// sched_getaffinity, taking one CPU per physical core before any SMT sibling (round robin if
// there are more threads than CPUs; pinning failures are ignored). Each thread first-touches
// its own buffer of `bytes_per_thread` (rounded down to 256 bytes, at least 4 KiB; 2 MiB
// huge pages requested) and reads it with 256-bit loads into independent accumulators,
// alternately as one sequential stream and as 8 interleaved streams; the result is the best
// pass of either pattern. Choose bytes_per_thread x threads well above the L3 size.
double measure_read_bandwidth_gbs(int threads, std::size_t bytes_per_thread, int reps);

// fp32 FMA peak in GFLOP/s (one 256-bit FMA = 16 flops), all threads together, best of 25
// runs of about 5 ms after a 20 ms warm-up. 12 independent ymm accumulator chains per
// thread, enough to cover FMA latency times FMA ports on current x86 cores (2 ports,
// latency 4-5). Same threading and pinning rules as above.
double measure_fma_peak_gflops(int threads);

}  // namespace lk::bench
