#include "bioquant/kernels/cpu/matmul.h"

#include <algorithm>

#include "bioquant/core/error.h"
#include "bioquant/core/half.h"
#include "bioquant/kernels/cpu/cpu_kernels.h"

namespace bioquant {

Matrix Matrix::plain(DType dtype, int64_t rows, int64_t cols, const uint8_t* data) {
  QuantType t = QuantType::F32;
  switch (dtype) {
    case DType::F32: t = QuantType::F32; break;
    case DType::F16: t = QuantType::F16; break;
    case DType::BF16: t = QuantType::BF16; break;
    default: throw Error(std::string("weights of dtype ") + dtype_name(dtype) + " are not supported (F32, F16, BF16)");
  }
  return Matrix{t, rows, cols, data, false};
}

Matrix Matrix::row_slice(int64_t begin, int64_t count) const {
  Matrix m = *this;
  m.rows = count;
  m.data = data + static_cast<size_t>(begin) * row_bytes();
  return m;
}

void Matrix::row_to_f32(int64_t r, float* out) const {
  const uint8_t* row = data + static_cast<size_t>(r) * row_bytes();
  switch (type) {
    case QuantType::F32:
      std::copy_n(reinterpret_cast<const float*>(row), cols, out);
      return;
    case QuantType::BF16:
      for (int64_t i = 0; i < cols; ++i) out[i] = bf16_to_f32(reinterpret_cast<const uint16_t*>(row)[i]);
      return;
    case QuantType::F16:
      for (int64_t i = 0; i < cols; ++i) out[i] = f16_to_f32(reinterpret_cast<const uint16_t*>(row)[i]);
      return;
    default:
      dequantize_row(type, row, cols, out, double_quant);
  }
}

void matmul(const float* x, int64_t n_tokens, const Matrix& w, float* y, ThreadPool& pool) {
  const CpuKernels& k = cpu_kernels();
  GemmFn fn = nullptr;  // plain formats: the f32-activation kernels; quantized ones: quant_gemm
  switch (w.type) {
    case QuantType::F32: fn = k.gemm_f32; break;
    case QuantType::BF16: fn = k.gemm_bf16; break;
    case QuantType::F16: fn = k.gemm_f16; break;
    default: break;
  }
  // Split output rows into a few chunks per thread (multiples of 16 so SIMD tiles stay whole).
  const int64_t n_chunks_wanted = static_cast<int64_t>(pool.size()) * 4;
  int64_t chunk = (w.rows + n_chunks_wanted - 1) / n_chunks_wanted;
  chunk = std::max<int64_t>(16, (chunk + 15) / 16 * 16);
  const int64_t n_chunks = (w.rows + chunk - 1) / chunk;
  const size_t row_bytes = w.row_bytes();
  const WeightView view{w.type, w.double_quant, w.rows, w.cols, w.data, row_bytes};
  pool.parallel_for(static_cast<size_t>(n_chunks), [&](size_t c) {
    const int64_t begin = static_cast<int64_t>(c) * chunk;
    const int64_t end = std::min(w.rows, begin + chunk);
    if (fn != nullptr) {
      fn(x, w.cols, n_tokens, w.data, row_bytes, w.cols, begin, end, y, w.rows);
    } else {
      quant_gemm(x, w.cols, n_tokens, view, begin, end, y, w.rows);
    }
  });
}

}  // namespace bioquant
