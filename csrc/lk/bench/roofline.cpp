// Roofline probes (see roofline.h). Built with -mavx2 -mfma -mf16c; the two public entry
// points are compiled for the baseline ISA and check the CPU before running any AVX code.
#include "roofline.h"

#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <utility>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace lk::bench {
namespace {

using Clock = std::chrono::steady_clock;

// ---------------------------------------------------------------- threads and pinning

std::vector<int> affinity_cpus() {
  std::vector<int> cpus;
  for (int ncpu = 1024; ncpu <= (1 << 20); ncpu *= 2) {
    cpu_set_t* set = CPU_ALLOC(ncpu);
    if (set == nullptr) break;
    const std::size_t size = CPU_ALLOC_SIZE(ncpu);
    CPU_ZERO_S(size, set);
    if (sched_getaffinity(0, size, set) == 0) {
      for (int c = 0; c < ncpu; ++c)
        if (CPU_ISSET_S(c, size, set)) cpus.push_back(c);
      CPU_FREE(set);
      return cpus;
    }
    CPU_FREE(set);  // EINVAL: mask too small for the kernel's CPU count, try a larger one
  }
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  for (long c = 0; c < std::max(1L, n); ++c) cpus.push_back(static_cast<int>(c));
  return cpus;
}

long read_sysfs_long(int cpu, const char* leaf) {
  const std::string path =
      "/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/topology/" + leaf;
  FILE* f = std::fopen(path.c_str(), "r");
  if (f == nullptr) return -1;
  long v = -1;
  if (std::fscanf(f, "%ld", &v) != 1) v = -1;
  std::fclose(f);
  return v;
}

// The CPUs we may run on, one per physical core first (so n threads <= cores never share a
// core's FMA units or load ports as SMT siblings: AMD and Intel both number siblings in
// ways that differ between machines), then the remaining SMT siblings.
std::vector<int> allowed_cpus() {
  const std::vector<int> cpus = affinity_cpus();
  std::vector<int> first, rest;
  std::vector<std::pair<long, long>> seen;
  for (int c : cpus) {
    const std::pair<long, long> core{read_sysfs_long(c, "physical_package_id"),
                                     read_sysfs_long(c, "core_id")};
    const bool known = core.second >= 0;
    if (known && std::find(seen.begin(), seen.end(), core) != seen.end()) {
      rest.push_back(c);
    } else {
      if (known) seen.push_back(core);
      first.push_back(c);
    }
  }
  first.insert(first.end(), rest.begin(), rest.end());
  return first;
}

void pin_self(int cpu) {
  const int ncpu = std::max(cpu + 1, 1024);
  cpu_set_t* set = CPU_ALLOC(ncpu);
  if (set == nullptr) return;
  const std::size_t size = CPU_ALLOC_SIZE(ncpu);
  CPU_ZERO_S(size, set);
  CPU_SET_S(cpu, size, set);
  (void)pthread_setaffinity_np(pthread_self(), size, set);  // best effort (cgroups, VMs)
  CPU_FREE(set);
}

// Barrier that spins briefly, then yields (threads may outnumber CPUs).
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    const unsigned gen = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      count_.store(0, std::memory_order_relaxed);
      gen_.fetch_add(1, std::memory_order_release);
      return;
    }
    for (int spins = 0; gen_.load(std::memory_order_acquire) == gen; ++spins) {
      if (spins < 4096)
        _mm_pause();
      else
        std::this_thread::yield();
    }
  }

 private:
  const int n_;
  std::atomic<int> count_{0};
  std::atomic<unsigned> gen_{0};
};

// Runs body(tid) on `threads` pinned threads and rethrows the first exception.
template <class Body>
void run_pinned(int threads, Body body) {
  const std::vector<int> cpus = allowed_cpus();
  std::vector<std::thread> pool;
  std::vector<std::exception_ptr> errors(threads);
  pool.reserve(threads);
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      pin_self(cpus[t % cpus.size()]);
      try {
        body(t);
      } catch (...) {
        errors[t] = std::current_exception();
      }
    });
  }
  for (auto& th : pool) th.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

int resolve_threads(int threads) {
  if (threads > 0) return threads;
  return static_cast<int>(std::max<std::size_t>(1, allowed_cpus().size()));
}

std::atomic<std::uint64_t> g_sink{0};  // keeps results alive

// Start and end of every thread's work in every rep. A rep lasts from the first thread's
// start to the last thread's end: timing one thread between barriers would miss work the
// others did while it was descheduled, and overstate bandwidth on a loaded machine.
class RepTimes {
 public:
  RepTimes(int reps, int threads)
      : threads_(threads), start_(std::size_t(reps) * threads), end_(start_.size()) {}
  void begin(int rep, int t) { start_[std::size_t(rep) * threads_ + t] = Clock::now(); }
  void finish(int rep, int t) { end_[std::size_t(rep) * threads_ + t] = Clock::now(); }
  double best_seconds() const {
    double best = 0.0;
    const std::size_t reps = start_.size() / threads_;
    for (std::size_t r = 0; r < reps; ++r) {
      const auto first = std::min_element(start_.begin() + r * threads_,
                                          start_.begin() + (r + 1) * threads_);
      const auto last = std::max_element(end_.begin() + r * threads_,
                                         end_.begin() + (r + 1) * threads_);
      const double s = std::chrono::duration<double>(*last - *first).count();
      if (r == 0 || s < best) best = s;
    }
    return std::max(best, 1e-9);
  }

 private:
  std::size_t threads_;
  std::vector<Clock::time_point> start_, end_;
};

// ---------------------------------------------------------------- read bandwidth

// Reads [p, p + bytes) with 256-bit loads into 8 independent xor chains, as kStreams
// interleaved sequential streams (part s = [s * bytes / kStreams, (s + 1) * bytes / kStreams)).
// Several concurrent streams keep more DRAM pages and prefetchers busy than one does, and
// kernels that read a panel of rows at once do the same; the probe reports the better of 1
// and 8 streams.
template <int kStreams>
__attribute__((noinline)) std::uint64_t read_sweep(const std::uint8_t* p, std::size_t bytes) {
  static_assert(kStreams == 1 || kStreams == 2 || kStreams == 4 || kStreams == 8, "");
  constexpr int kPerStream = 8 / kStreams;  // loads per stream per iteration
  __m256i acc[8];
  for (auto& a : acc) a = _mm256_setzero_si256();
  const std::size_t part = bytes / kStreams;  // bytes % 256 == 0, so part % 32 == 0
  for (std::size_t off = 0; off < part; off += 32 * kPerStream) {
#pragma GCC unroll 8
    for (int s = 0; s < kStreams; ++s) {
#pragma GCC unroll 8
      for (int j = 0; j < kPerStream; ++j) {
        const auto* v = reinterpret_cast<const __m256i*>(p + s * part + off + 32 * j);
        acc[s * kPerStream + j] = _mm256_xor_si256(acc[s * kPerStream + j], _mm256_load_si256(v));
      }
    }
  }
  __m256i x = acc[0];
  for (int i = 1; i < 8; ++i) x = _mm256_xor_si256(x, acc[i]);
  return static_cast<std::uint64_t>(_mm256_extract_epi64(x, 0) ^ _mm256_extract_epi64(x, 1) ^
                                    _mm256_extract_epi64(x, 2) ^ _mm256_extract_epi64(x, 3));
}

// One anonymous mapping per thread, 2 MiB aligned and marked for transparent huge pages so
// TLB misses do not lower the ceiling. Pages are first touched by the owning (pinned)
// thread, so on NUMA machines each buffer lives on its reader's node.
struct Mapping {
  void* base = MAP_FAILED;
  std::size_t length = 0;
  std::uint8_t* data = nullptr;
  Mapping() = default;
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  ~Mapping() {
    if (base != MAP_FAILED) munmap(base, length);
  }
};

constexpr std::size_t kHuge = std::size_t(2) << 20;

double read_bandwidth_impl(int threads, std::size_t bytes_per_thread, int reps) {
  threads = resolve_threads(threads);
  reps = std::max(1, reps);
  const std::size_t bytes = std::max<std::size_t>(4096, bytes_per_thread & ~std::size_t(255));

  std::vector<Mapping> maps(threads);
  for (auto& m : maps) {
    m.length = bytes + kHuge;
    m.base = mmap(nullptr, m.length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m.base == MAP_FAILED)
      throw std::runtime_error("measure_read_bandwidth_gbs: cannot map " +
                               std::to_string(m.length) + " bytes");
    const auto addr = reinterpret_cast<std::uintptr_t>(m.base);
    m.data = reinterpret_cast<std::uint8_t*>((addr + kHuge - 1) & ~(kHuge - 1));
#ifdef MADV_HUGEPAGE
    (void)madvise(m.data, bytes, MADV_HUGEPAGE);
#endif
  }

  Barrier barrier(threads);
  RepTimes times(2 * reps, threads);
  run_pinned(threads, [&](int t) {
    std::uint8_t* p = maps[t].data;
    for (std::size_t i = 0; i < bytes; i += 8) {  // first touch; non-zero, varying contents
      const std::uint64_t v = (i * 0x9E3779B97F4A7C15ull) ^ static_cast<std::uint64_t>(t);
      __builtin_memcpy(p + i, &v, 8);
    }
    std::uint64_t acc = read_sweep<8>(p, bytes);  // warm-up pass (TLB, prefetchers, clocks)
    for (int r = 0; r < 2 * reps; ++r) {  // alternate the two access patterns
      barrier.wait();
      times.begin(r, t);
      acc ^= (r & 1) ? read_sweep<1>(p, bytes) : read_sweep<8>(p, bytes);
      times.finish(r, t);
      barrier.wait();
    }
    g_sink.fetch_xor(acc, std::memory_order_relaxed);
  });

  return static_cast<double>(bytes) * threads / times.best_seconds() / 1e9;
}

// ---------------------------------------------------------------- FMA peak

constexpr int kChains = 12;  // independent ymm accumulators per thread (+2 operands = 14 regs)

// acc = acc * a + b on 12 chains; converges to b / (1 - a): no overflow, no denormals.
__attribute__((noinline)) float fma_chains(long iters, float seed) {
  const __m256 a = _mm256_set1_ps(0.999f);
  const __m256 b = _mm256_set1_ps(1e-4f);
  __m256 c0 = _mm256_set1_ps(seed), c1 = _mm256_add_ps(c0, b), c2 = _mm256_add_ps(c1, b),
         c3 = _mm256_add_ps(c2, b), c4 = _mm256_add_ps(c3, b), c5 = _mm256_add_ps(c4, b),
         c6 = _mm256_add_ps(c5, b), c7 = _mm256_add_ps(c6, b), c8 = _mm256_add_ps(c7, b),
         c9 = _mm256_add_ps(c8, b), c10 = _mm256_add_ps(c9, b), c11 = _mm256_add_ps(c10, b);
  for (long i = 0; i < iters; ++i) {
    c0 = _mm256_fmadd_ps(c0, a, b);
    c1 = _mm256_fmadd_ps(c1, a, b);
    c2 = _mm256_fmadd_ps(c2, a, b);
    c3 = _mm256_fmadd_ps(c3, a, b);
    c4 = _mm256_fmadd_ps(c4, a, b);
    c5 = _mm256_fmadd_ps(c5, a, b);
    c6 = _mm256_fmadd_ps(c6, a, b);
    c7 = _mm256_fmadd_ps(c7, a, b);
    c8 = _mm256_fmadd_ps(c8, a, b);
    c9 = _mm256_fmadd_ps(c9, a, b);
    c10 = _mm256_fmadd_ps(c10, a, b);
    c11 = _mm256_fmadd_ps(c11, a, b);
  }
  __m256 s = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(c0, c1), _mm256_add_ps(c2, c3)),
                           _mm256_add_ps(_mm256_add_ps(c4, c5), _mm256_add_ps(c6, c7)));
  s = _mm256_add_ps(s, _mm256_add_ps(_mm256_add_ps(c8, c9), _mm256_add_ps(c10, c11)));
  alignas(32) float out[8];
  _mm256_store_ps(out, s);
  return out[0] + out[1] + out[2] + out[3] + out[4] + out[5] + out[6] + out[7];
}

double fma_peak_impl(int threads) {
  threads = resolve_threads(threads);

  // Size one run to ~5 ms on this core, measured single-threaded: many short runs give the
  // best-of a chance to fall between other processes' time slices on a shared machine.
  long iters = 1L << 16;
  for (;;) {
    const auto t0 = Clock::now();
    g_sink.fetch_add(static_cast<std::uint64_t>(fma_chains(iters, 1.0f)),
                     std::memory_order_relaxed);
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    if (s > 0.005 || iters > (1L << 40)) {
      iters = static_cast<long>(static_cast<double>(iters) * 0.005 / std::max(s, 1e-6));
      break;
    }
    iters *= 4;
  }
  iters = std::max(iters, 1L << 16);

  constexpr int kReps = 25;
  Barrier barrier(threads);
  RepTimes times(kReps, threads);
  run_pinned(threads, [&](int t) {
    float acc = fma_chains(4 * iters, 1.0f + t);  // warm-up (clocks, AVX power licence)
    for (int r = 0; r < kReps; ++r) {
      barrier.wait();
      times.begin(r, t);
      acc += fma_chains(iters, 1.0f + t);
      times.finish(r, t);
      barrier.wait();
    }
    g_sink.fetch_add(static_cast<std::uint64_t>(acc), std::memory_order_relaxed);
  });

  const double flops = static_cast<double>(iters) * kChains * 16.0 * threads;  // 8 lanes x 2
  return flops / times.best_seconds() / 1e9;
}

}  // namespace

// The entry points are compiled for the baseline ISA so that a CPU without AVX2/FMA gets an
// error rather than SIGILL (libgcc's check includes the OS's YMM state support).
#if defined(__GNUC__) && !defined(__INTEL_COMPILER)
#define LK_BENCH_BASELINE __attribute__((target("no-avx")))
#else
#define LK_BENCH_BASELINE
#endif

namespace {
LK_BENCH_BASELINE bool cpu_ok() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
}  // namespace

LK_BENCH_BASELINE double measure_read_bandwidth_gbs(int threads, std::size_t bytes_per_thread,
                                                    int reps) {
  // runtime_error(const char*) lives in libstdc++, so no AVX code runs on this path.
  if (!cpu_ok()) throw std::runtime_error("measure_read_bandwidth_gbs: this CPU lacks AVX2/FMA");
  return read_bandwidth_impl(threads, bytes_per_thread, reps);
}

LK_BENCH_BASELINE double measure_fma_peak_gflops(int threads) {
  if (!cpu_ok()) throw std::runtime_error("measure_fma_peak_gflops: this CPU lacks AVX2/FMA");
  return fma_peak_impl(threads);
}

}  // namespace lk::bench
