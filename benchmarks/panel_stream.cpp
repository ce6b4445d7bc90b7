// What the INT4 panel layout costs a decode out of DRAM: bench_panel_stream.py builds and runs
// this. Each thread streams the panels of one engine call (two streams, panel p beside
// p + half, as linear_engine.cpp and moe_forward.cpp pair them) through the INT4 decode's
// work (unpack, one multiply-add per 32 bytes, lk's prefetch distances), over a buffer far
// larger than the L3, in three arrangements of the same bytes:
//   stored:     each panel's values, then its scale rows, then its offset rows (formats.h);
//   inline:     each group's values followed by its own scale and offset rows;
//   sequential: the same bytes read with plain loads, no arithmetic (the ceiling).
// It prints GB/s (values and scales together) per arrangement and round.
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <sys/mman.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

namespace {

constexpr long kDepth = 2048, kGroup = 128, kPanelWidth = 16;
constexpr long kGroupValueBytes = kGroup * kPanelWidth / 2;  // 4 bits a weight
constexpr long kGroupRowBytes = kPanelWidth * 4;             // fp32 scales (and offsets)
constexpr long kGroups = kDepth / kGroup;
constexpr long kPanelBytes = kGroups * (kGroupValueBytes + 2 * kGroupRowBytes);
constexpr long kPrefetchBytes = 16384, kL1FetchBytes = 512;  // as Int4Unpack's

enum class Layout { Stored, Inline, Sequential };

struct Addresses {  // where group g's values, scales and offsets lie in a panel
  long values, scales, offsets;
};

Addresses group_at(Layout layout, long g) {
  if (layout == Layout::Stored) {
    const long values_end = kGroups * kGroupValueBytes;
    return {g * kGroupValueBytes, values_end + g * kGroupRowBytes, values_end + (kGroups + g) * kGroupRowBytes};
  }
  const long start = g * (kGroupValueBytes + 2 * kGroupRowBytes);
  return {start, start + kGroupValueBytes, start + kGroupValueBytes + kGroupRowBytes};
}

#ifdef __AVX512VNNI__
using Acc = __m512i;
Acc multiply_add(Acc acc, __m256i words) {
  const __m256i centred = _mm256_xor_si256(words, _mm256_set1_epi8(static_cast<char>(0x88)));
  const __m512i halves = _mm512_inserti64x4(_mm512_castsi256_si512(centred), _mm256_srli_epi16(centred, 4), 1);
  return _mm512_dpbusd_epi32(acc, _mm512_and_si512(halves, _mm512_set1_epi8(0x0f)), _mm512_set1_epi32(0x01020304));
}
Acc add_line(Acc acc, const uint8_t* line) { return _mm512_add_epi32(acc, _mm512_loadu_si512(line)); }
Acc xor_load(Acc acc, const uint8_t* p) {
  return _mm512_xor_si512(acc, _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
}
int64_t reduce(Acc acc) {
  alignas(64) int32_t lanes[16];
  _mm512_store_si512(lanes, acc);
  int64_t sum = 0;
  for (int32_t lane : lanes) sum += lane;
  return sum;
}
#else
using Acc = __m256i;
Acc multiply_add(Acc acc, __m256i words) {
  const __m256i low = _mm256_and_si256(words, _mm256_set1_epi8(0x0f));
  const __m256i high = _mm256_and_si256(_mm256_srli_epi16(words, 4), _mm256_set1_epi8(0x0f));
  const __m256i x = _mm256_set1_epi32(0x01020304);
  const __m256i sums = _mm256_add_epi16(_mm256_maddubs_epi16(low, x), _mm256_maddubs_epi16(high, x));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(sums, _mm256_set1_epi16(1)));
}
Acc add_line(Acc acc, const uint8_t* line) {
  return _mm256_add_epi32(acc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(line)));
}
Acc xor_load(Acc acc, const uint8_t* p) {
  return _mm256_xor_si256(acc, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
int64_t reduce(Acc acc) {
  alignas(32) int32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc);
  int64_t sum = 0;
  for (int32_t lane : lanes) sum += lane;
  return sum;
}
#endif

// One group of two panels side by side, as the engine's integer decode walks it: the
// stream fetched kPrefetchBytes ahead into L2 and kL1FetchBytes ahead into L1, the group's
// scale and offset rows loaded once.
void decode_group(Layout layout, const uint8_t* const (&panels)[2], long g, Acc (&acc)[2][4]) {
  const Addresses at = group_at(layout, g);
  for (int p = 0; p < 2; ++p) {
    acc[p][0] = add_line(acc[p][0], panels[p] + at.scales);
    acc[p][1] = add_line(acc[p][1], panels[p] + at.offsets);
  }
  for (long off = 0; off < kGroupValueBytes; off += 128) {
    for (int p = 0; p < 2; ++p)
      for (long line = 0; line < 128; line += 64) {
        const char* here = reinterpret_cast<const char*>(panels[p] + at.values + off + line);
        _mm_prefetch(here + kPrefetchBytes, _MM_HINT_T2);
        _mm_prefetch(here + kL1FetchBytes, _MM_HINT_T0);
      }
    for (int s = 0; s < 4; ++s)
      for (int p = 0; p < 2; ++p)
        acc[p][s] = multiply_add(
            acc[p][s], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(panels[p] + at.values + off + 32 * s)));
  }
}

int64_t decode_pair(Layout layout, const uint8_t* first, const uint8_t* second) {
  const uint8_t* const panels[2] = {first, second};
  Acc acc[2][4] = {};
  if (layout == Layout::Stored) {  // the panel's head and every scale row asked for at once
    for (int p = 0; p < 2; ++p) {
      for (long line = 0; line < kPrefetchBytes; line += 64) _mm_prefetch(reinterpret_cast<const char*>(panels[p] + line), _MM_HINT_T2);
      for (long line = kGroups * kGroupValueBytes; line < kPanelBytes; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(panels[p] + line), _MM_HINT_T2);
    }
  } else {
    for (int p = 0; p < 2; ++p)
      for (long line = 0; line < kPrefetchBytes; line += 64) _mm_prefetch(reinterpret_cast<const char*>(panels[p] + line), _MM_HINT_T2);
  }
  for (long g = 0; g < kGroups; ++g) decode_group(layout, panels, g, acc);
  int64_t sum = 0;
  for (auto& row : acc)
    for (Acc a : row) sum += reduce(a);
  return sum;
}

int64_t read_panel(const uint8_t* panel) {
  Acc acc[4] = {};
  for (long off = 0; off < kPanelBytes; off += 128)
    for (int s = 0; s < 4; ++s) acc[s] = xor_load(acc[s], panel + off + 32 * s);
  return reduce(acc[0]) + reduce(acc[1]) + reduce(acc[2]) + reduce(acc[3]);
}

// One call's share of a thread: panels [first, first + count), paired p with p + count / 2.
int64_t run_call(Layout layout, const uint8_t* base, long first, long count) {
  int64_t sum = 0;
  if (layout == Layout::Sequential) {
    for (long p = 0; p < count; ++p) sum += read_panel(base + (first + p) * kPanelBytes);
    return sum;
  }
  const long half = count / 2;
  for (long p = 0; p < half; ++p)
    sum += decode_pair(layout, base + (first + p) * kPanelBytes, base + (first + half + p) * kPanelBytes);
  return sum;
}

class Barrier {
 public:
  explicit Barrier(int threads) : threads_(threads) {}
  void wait() {
    const int generation = generation_.load();
    if (arrived_.fetch_add(1) == threads_ - 1) {
      arrived_.store(0);
      generation_.fetch_add(1);
    } else {
      while (generation_.load() == generation) _mm_pause();
    }
  }

 private:
  const int threads_;
  std::atomic<int> arrived_{0}, generation_{0};
};

struct Options {
  int threads = 2, calls = 200, rounds = 5;
  long panels_per_call = 128;  // per thread: a 2.4 MB share, as a qkv projection's
  long buffer_mb = 1024;
};

// GB/s of `layout` over `calls` calls, each thread taking its share of every call and
// waiting for the others at its end, as the engine's workers do.
double time_layout(Layout layout, const Options& o, const uint8_t* buffer, long panels_in_buffer) {
  Barrier barrier(o.threads);
  std::vector<double> seconds(o.threads);
  std::atomic<int64_t> sink{0};
  auto worker = [&](int t) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(t, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
    int64_t sum = 0;
    barrier.wait();
    const auto start = std::chrono::steady_clock::now();
    for (long call = 0, first = 0; call < o.calls; ++call, first += o.threads * o.panels_per_call) {
      const long mine = (first + t * o.panels_per_call) % (panels_in_buffer - o.panels_per_call);
      sum += run_call(layout, buffer, mine, o.panels_per_call);
      barrier.wait();
    }
    seconds[t] = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    sink += sum;
  };
  std::vector<std::thread> pool;
  for (int t = 0; t < o.threads; ++t) pool.emplace_back(worker, t);
  for (auto& thread : pool) thread.join();
  return static_cast<double>(o.threads) * o.calls * o.panels_per_call * kPanelBytes / seconds[0] / 1e9;
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i + 1 < argc; i += 2) {
    const long value = std::atol(argv[i + 1]);
    if (!std::strcmp(argv[i], "--threads")) o.threads = static_cast<int>(value);
    else if (!std::strcmp(argv[i], "--calls")) o.calls = static_cast<int>(value);
    else if (!std::strcmp(argv[i], "--rounds")) o.rounds = static_cast<int>(value);
    else if (!std::strcmp(argv[i], "--panels-per-call")) o.panels_per_call = value;
    else if (!std::strcmp(argv[i], "--buffer-mb")) o.buffer_mb = value;
    else {
      std::fprintf(stderr, "unknown option %s (--threads, --calls, --rounds, --panels-per-call, --buffer-mb)\n", argv[i]);
      std::exit(2);
    }
  }
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  const long bytes = o.buffer_mb << 20, huge = 2L << 20;
  void* mapping = mmap(nullptr, bytes + huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mapping == MAP_FAILED) {
    std::perror("mmap");
    return 1;
  }
  auto* buffer = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(mapping) + huge - 1) & ~uintptr_t(huge - 1));
  madvise(buffer, bytes, MADV_HUGEPAGE);  // as lk's HostBuffer
  for (long i = 0; i < bytes; i += 8) {
    const uint64_t v = static_cast<uint64_t>(i) * 0x9E3779B97F4A7C15ull;
    std::memcpy(buffer + i, &v, 8);
  }
  const long panels = bytes / kPanelBytes;
  const char* names[] = {"stored", "inline", "sequential"};
  std::printf("round %s %s %s (GB/s)\n", names[0], names[1], names[2]);
  for (int round = 0; round < o.rounds; ++round) {
    std::printf("%d", round);
    for (Layout layout : {Layout::Stored, Layout::Inline, Layout::Sequential})
      std::printf(" %.2f", time_layout(layout, o, buffer, panels));
    std::printf("\n");
    std::fflush(stdout);
  }
  munmap(mapping, bytes + huge);
  return 0;
}
