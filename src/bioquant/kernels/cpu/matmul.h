// Matrix-level CPU operations: the thread split lives here, the inner loops in cpu_kernels.
#pragma once
#include <cstddef>
#include <cstdint>

#include "bioquant/core/dtype.h"
#include "bioquant/core/thread_pool.h"

namespace bioquant {

// A non-owning row-major weight matrix [rows, cols] in a storage dtype (F32, F16 or BF16).
struct Matrix {
  DType dtype = DType::F32;
  int64_t rows = 0;
  int64_t cols = 0;
  const uint8_t* data = nullptr;

  size_t row_bytes() const { return static_cast<size_t>(cols) * dtype_size(dtype); }
  size_t nbytes() const { return static_cast<size_t>(rows) * row_bytes(); }
  // Rows [begin, begin + count) as a matrix of their own (fused projections are split this way).
  Matrix row_slice(int64_t begin, int64_t count) const;
  // Row r converted to f32.
  void row_to_f32(int64_t r, float* out) const;
};

// y[t, o] = sum_k x[t, k] * w[o, k]: x is [n_tokens, w.cols], y is [n_tokens, w.rows].
void matmul(const float* x, int64_t n_tokens, const Matrix& w, float* y, ThreadPool& pool);

}  // namespace bioquant
