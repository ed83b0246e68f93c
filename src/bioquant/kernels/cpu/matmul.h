// Matrix-level CPU operations: the thread split lives here, the inner loops in cpu_kernels.
#pragma once
#include <cstddef>
#include <cstdint>
#include <span>

#include "bioquant/core/dtype.h"
#include "bioquant/core/thread_pool.h"
#include "bioquant/quant/quant.h"

namespace bioquant {

// A non-owning weight matrix [rows, cols] in any stored format (plain f32/f16/bf16 or a quantized
// format of quant/quant.h); rows are self-contained and row_bytes() apart.
struct Matrix {
  QuantType type = QuantType::F32;
  int64_t rows = 0;
  int64_t cols = 0;
  const uint8_t* data = nullptr;
  bool double_quant = false;  // nf4/fp4
  // int8 only, LLM.int8's mixed-precision decomposition (0 = off): input features whose activation
  // magnitude reaches this in any token are multiplied in f32 with the dequantized weight column;
  // the rest go through the int8 kernel. bitsandbytes' default threshold is 6.0.
  float outlier_threshold = 0.0f;
  // Synthetic weights made on the GPU (data == nullptr): row r is random_rows::make_row(type,
  // double_quant, cols, random_seed, r), written straight into device memory by the CUDA backend.
  uint64_t random_seed = 0;

  // A plain matrix of a file dtype (F32, F16, BF16); throws Error for other dtypes.
  static Matrix plain(DType dtype, int64_t rows, int64_t cols, const uint8_t* data);

  size_t row_bytes() const { return quant_row_bytes(type, cols, double_quant); }
  size_t nbytes() const { return static_cast<size_t>(rows) * row_bytes(); }
  const char* type_name() const { return quant_traits(type).name; }
  // Rows [begin, begin + count) as a matrix of their own (fused projections are split this way).
  Matrix row_slice(int64_t begin, int64_t count) const;
  // Row r converted to f32.
  void row_to_f32(int64_t r, float* out) const;
};

// y[t, o] = sum_k x[t, k] * w[o, k]: x is [n_tokens, w.cols], y is [n_tokens, w.rows].
void matmul(const float* x, int64_t n_tokens, const Matrix& w, float* y, ThreadPool& pool);

// Several matmuls of the same x (q/k/v, gate/up) in one parallel loop; results equal separate
// matmul() calls bit for bit.
struct MatmulJob {
  const Matrix* w;
  float* y;
};
void matmul_group(const float* x, int64_t n_tokens, std::span<const MatmulJob> jobs, ThreadPool& pool);

}  // namespace bioquant
