// A heap buffer aligned for O_DIRECT (posix_memalign), freed on destruction.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>

namespace thaw {

class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  AlignedBuffer(AlignedBuffer&& other) noexcept : data_(other.data_), size_(other.size_) {
    other.data_ = nullptr;
    other.size_ = 0;
  }
  AlignedBuffer& operator=(AlignedBuffer&& other) noexcept {
    if (this != &other) {
      std::free(data_);
      data_ = other.data_;
      size_ = other.size_;
      other.data_ = nullptr;
      other.size_ = 0;
    }
    return *this;
  }
  ~AlignedBuffer() { std::free(data_); }

  // Returns 0 or -errno (ENOMEM).
  int Allocate(size_t size, size_t alignment) {
    void* p = nullptr;
    int rc = posix_memalign(&p, alignment, size == 0 ? alignment : size);
    if (rc != 0) return -rc;
    std::free(data_);
    data_ = static_cast<uint8_t*>(p);
    size_ = size;
    return 0;
  }

  uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  bool allocated() const { return data_ != nullptr; }

 private:
  uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace thaw
