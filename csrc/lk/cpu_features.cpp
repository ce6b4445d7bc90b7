#include "lk/cpu_features.h"

#include <stdexcept>

#if defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace lk {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Generic: return "GENERIC";
    case Isa::Avx2: return "AVX2";
    case Isa::Avx512: return "AVX512";
    case Isa::Avx512Vnni: return "AVX512_VNNI";
    case Isa::Avx512Bf16: return "AVX512_BF16";
    case Isa::Amx: return "AMX";
  }
  return "?";
}

Isa parse_isa(const std::string& name) {
  std::string valid;
  for (Isa isa : kIsaLevels) {
    if (name == isa_name(isa)) return isa;
    valid += (valid.empty() ? "" : ", ") + std::string(isa_name(isa));
  }
  throw std::invalid_argument("unknown ISA '" + name + "': valid are " + valid);
}

#if defined(__x86_64__)
namespace {

unsigned long long read_xcr0() {
  unsigned int eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<unsigned long long>(edx) << 32) | eax;
}

// Linux hands out AMX tile state only to processes that ask for it.
bool request_amx_permission() {
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

}  // namespace

Isa detect_best_isa() {
  unsigned int eax, ebx, ecx, edx;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return Isa::Generic;
  const bool fma = ecx & (1u << 12), osxsave = ecx & (1u << 27), avx = ecx & (1u << 28),
             f16c = ecx & (1u << 29);
  if (!(fma && osxsave && avx && f16c)) return Isa::Generic;
  const unsigned long long xcr0 = read_xcr0();
  if ((xcr0 & 0x6) != 0x6) return Isa::Generic;  // XMM and YMM state
  __cpuid_count(7, 0, eax, ebx, ecx, edx);
  if (!(ebx & (1u << 5))) return Isa::Generic;  // AVX2
  const bool avx512 = (ebx & (1u << 16)) && (ebx & (1u << 17)) && (ebx & (1u << 30)) &&
                      (ebx & (1u << 31)) && (xcr0 & 0xe0) == 0xe0;  // F, DQ, BW, VL, ZMM state
  if (!avx512) return Isa::Avx2;
  if (!(ecx & (1u << 11))) return Isa::Avx512;  // AVX512_VNNI
  // AVX512_BF16 (leaf 7.1: converts fp32 to bf16 and multiplies bf16 pairs) and
  // AVX512_VBMI (byte permutes widen FP8 weights to bf16): Zen 4 and later, and every CPU
  // with AMX. Cooper Lake has AVX512_BF16 without VBMI and stays at AVX512_VNNI.
  unsigned int sub_eax = 0, sub_ebx, sub_ecx, sub_edx;
  if (eax >= 1) __cpuid_count(7, 1, sub_eax, sub_ebx, sub_ecx, sub_edx);
  const bool avx512_bf16 = (sub_eax & (1u << 5)) && (ecx & (1u << 1));
  if (!avx512_bf16) return Isa::Avx512Vnni;
  // AMX-BF16, AMX-TILE, AMX-INT8, with the OS saving tile state and granting it.
  const bool amx = (edx & (1u << 22)) && (edx & (1u << 24)) && (edx & (1u << 25));
  if (amx && (xcr0 & (3ull << 17)) == (3ull << 17) && request_amx_permission()) return Isa::Amx;
  return Isa::Avx512Bf16;
}
#else
Isa detect_best_isa() { return Isa::Generic; }
#endif

}  // namespace lk
