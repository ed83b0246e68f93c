// Device memory counted by purpose (weights, KV cache, work), under the process-wide limit, and the
// device-side rows of synthetic models.
// Part of the CUDA backend's single translation unit: included by gpu_decoder.cu (directly or through
// the files it includes) and nowhere else, so its definitions share that file's anonymous namespace.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>

#include "bioquant/core/error.h"
#include "bioquant/quant/quant.h"
#include "bioquant/quant/random_rows.h"

namespace bioquant {
namespace {

enum class Pool { Weights, Kv, Work };

// The driver hands device memory out in 2 MiB pages.
constexpr size_t kDevicePage = size_t{2} << 20;
inline size_t page_rounded(size_t n) { return (n + kDevicePage - 1) / kDevicePage * kDevicePage; }
inline std::string mib_text(size_t n) { return std::to_string((n + (size_t{1} << 19)) >> 20) + " MiB"; }

// Process-wide device memory limit (set_cuda_memory_limit; 0: the card's own).
size_t g_memory_limit = 0;

// Device total - free, as the driver counts it (the CUDA context and other processes included).
size_t device_used_now() {
  size_t free_b = 0, total_b = 0;
  if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) return 0;
  return total_b - free_b;
}

struct Allocator {
  size_t bytes[3] = {0, 0, 0};
  size_t peak = 0;
  void* alloc(size_t n, Pool p) {
    void* ptr = nullptr;
    if (n == 0) return nullptr;
    if (const size_t limit = g_memory_limit; limit > 0) {
      const size_t used = device_used_now();
      if (used + page_rounded(n) > limit)
        throw Error("CUDA: allocating " + mib_text(n) + " would take the device to " + mib_text(used + n) +
                    ", over the memory limit of " + mib_text(limit) + " (--gpu-memory; " +
                    mib_text(bytes[0] + bytes[1] + bytes[2]) + " already held by this model)");
    }
    const cudaError_t e = cudaMalloc(&ptr, n);
    if (e != cudaSuccess) {
      cudaGetLastError();
      throw Error("CUDA: out of GPU memory allocating " + std::to_string(n >> 20) + " MiB (" +
                  std::to_string((bytes[0] + bytes[1] + bytes[2]) >> 20) + " MiB already held by this model)");
    }
    bytes[static_cast<int>(p)] += n;
    peak = std::max(peak, bytes[0] + bytes[1] + bytes[2]);
    return ptr;
  }
  void free(void* ptr, size_t n, Pool p) {
    if (ptr == nullptr) return;
    cudaFree(ptr);
    bytes[static_cast<int>(p)] -= n;
  }
};

struct DevBuf {
  void* ptr = nullptr;
  size_t n = 0;
  Pool pool = Pool::Work;
};

struct DevMatrix {
  QuantType type = QuantType::F32;
  int64_t rows = 0, cols = 0;
  size_t row_bytes = 0;
  bool dq = false;
  const uint8_t* data = nullptr;
};

struct DevLayer {
  DevMatrix wq, wk, wv, wo, w_gate, w_up, w_down;
  const float *bq = nullptr, *bk = nullptr, *bv = nullptr, *bo = nullptr, *b_gate = nullptr, *b_up = nullptr,
              *b_down = nullptr;
  const float *attn_norm = nullptr, *attn_post_norm = nullptr, *ffn_norm = nullptr, *ffn_post_norm = nullptr;
  const float *q_norm = nullptr, *k_norm = nullptr;
};

// Writes the rows of a synthetic matrix straight into device memory: a thread per row.
__global__ void random_rows_kernel(QuantType t, bool dq, int64_t cols, uint64_t seed, int64_t rows, size_t row_bytes,
                                   uint8_t* out) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r < rows) random_rows::make_row(t, dq, cols, seed, r, out + static_cast<size_t>(r) * row_bytes);
}

}  // namespace
}  // namespace bioquant
