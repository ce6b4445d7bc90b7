#include "lk/host_buffer.h"

#include <sys/mman.h>

#include <new>
#include <utility>

namespace lk {

HostBuffer::HostBuffer(std::size_t bytes) : bytes_(bytes) {
  if (bytes == 0) return;
  void* memory = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (memory == MAP_FAILED) throw std::bad_alloc();
  // Weights are streamed: huge pages cut TLB misses where the kernel allows them.
  madvise(memory, bytes, MADV_HUGEPAGE);
  data_ = memory;
}

HostBuffer::~HostBuffer() {
  if (data_) munmap(data_, bytes_);
}

HostBuffer::HostBuffer(HostBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}

HostBuffer& HostBuffer::operator=(HostBuffer&& other) noexcept {
  if (this != &other) {
    if (data_) munmap(data_, bytes_);
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

void HostBuffer::ensure(std::size_t bytes) {
  if (bytes > bytes_) *this = HostBuffer(bytes);
}

}  // namespace lk
