// AMX tile registers: their shape for a call (RAII) and the few instructions the kernels use.
//
// GCC 12's intrinsics are not used: its _tile_loadd declares no memory input and its
// _tile_loadconfig declares 8 bytes of the 64-byte configuration read, so stores into a
// buffer (or into the configuration) could legally move past the instruction that reads
// them. Each statement here reads or writes "memory" as far as the compiler knows. Tile
// numbers are template arguments, printed into the instruction (%c).
#pragma once

#include <cstdint>

namespace lk::kernels {
namespace {

// Every tile 16 rows of 64 bytes, for one kernel call. The destructor releases the tile
// state, so a thread outside the kernels holds none (the OS saves and restores 8 KiB of it
// at every context switch of a thread that does).
class TileShapes {
 public:
  TileShapes() {
    Palette palette{};
    palette.id = 1;
    for (int tile = 0; tile < 8; ++tile) {
      palette.bytes_per_row[tile] = 64;
      palette.rows[tile] = 16;
    }
    asm volatile("ldtilecfg %0" ::"m"(palette) : "memory");
  }
  ~TileShapes() { asm volatile("tilerelease" ::: "memory"); }
  TileShapes(const TileShapes&) = delete;
  TileShapes& operator=(const TileShapes&) = delete;

 private:
  struct alignas(64) Palette {
    uint8_t id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
  };
};

template <int Tile>
inline void tile_load(const void* base, long stride) {
  asm volatile("tileloadd (%0,%1,1), %%tmm%c2" ::"r"(base), "r"(stride), "n"(Tile) : "memory");
}
template <int Tile>
inline void tile_store(void* base, long stride) {
  asm volatile("tilestored %%tmm%c2, (%0,%1,1)" ::"r"(base), "r"(stride), "n"(Tile) : "memory");
}
template <int Tile>
inline void tile_zero() {
  asm volatile("tilezero %%tmm%c0" ::"n"(Tile));
}
// Tile C += tile A x tile B, A's rows by B's columns, by the products each names: bytes
// signed x unsigned, signed x signed, unsigned x signed (32-bit sums of four products), bf16
// pairs (fp32 sums of two). The kernels take one of these as their Dot.
struct SignedUnsigned {
  template <int C, int A, int B>
  static void dot() {
    asm volatile("tdpbsud %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"n"(C), "n"(A), "n"(B));
  }
};
struct SignedSigned {
  template <int C, int A, int B>
  static void dot() {
    asm volatile("tdpbssd %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"n"(C), "n"(A), "n"(B));
  }
};
struct UnsignedSigned {
  template <int C, int A, int B>
  static void dot() {
    asm volatile("tdpbusd %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"n"(C), "n"(A), "n"(B));
  }
};
struct Bf16Pairs {
  template <int C, int A, int B>
  static void dot() {
    asm volatile("tdpbf16ps %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"n"(C), "n"(A), "n"(B));
  }
};

}  // namespace
}  // namespace lk::kernels
