#include <cstring>
#include <new>
#include <utility>

#include "bioquant/kernels/cuda/gpu_decoder.h"

namespace bioquant {

HostFloats::HostFloats(size_t n, bool pinned) : size_(n), pinned_(pinned && n > 0) {
  if (n == 0) return;
  data_ = pinned_ ? static_cast<float*>(cuda_pinned_alloc(n * sizeof(float))) : new float[n];
  std::memset(data_, 0, n * sizeof(float));
}

HostFloats::~HostFloats() { release(); }

HostFloats::HostFloats(HostFloats&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)), pinned_(std::exchange(other.pinned_, false)) {}

HostFloats& HostFloats::operator=(HostFloats&& other) noexcept {
  if (this != &other) {
    release();
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    pinned_ = std::exchange(other.pinned_, false);
  }
  return *this;
}

void HostFloats::release() {
  if (data_ == nullptr) return;
  if (pinned_)
    cuda_pinned_free(data_);
  else
    delete[] data_;
  data_ = nullptr;
  size_ = 0;
}

}  // namespace bioquant
