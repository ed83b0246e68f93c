#include "bioquant/kernels/cpu/matmul.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <span>
#include <vector>

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

namespace {

// Input features (columns of x) whose magnitude reaches `threshold` in any token.
std::vector<int64_t> outlier_columns(const float* x, int64_t n_tokens, int64_t cols, float threshold) {
  std::vector<int64_t> out;
  for (int64_t c = 0; c < cols; ++c) {
    for (int64_t t = 0; t < n_tokens; ++t) {
      if (std::fabs(x[t * cols + c]) >= threshold) {
        out.push_back(c);
        break;
      }
    }
  }
  return out;
}


// Row chunks of every job in one parallel loop, so matrices that read the same input (q/k/v,
// gate/up) share one fork-join. Chunks are multiples of 16 rows (SIMD tiles stay whole), a few per
// thread so a thread slowed by anything else does not hold the others up; each row's result does
// not depend on the chunking.
void run_matmuls(const float* x, int64_t n_tokens, std::span<const MatmulJob> jobs, ThreadPool& pool) {
  struct Chunk {
    const MatmulJob* job;
    GemmFn fn;  // plain formats: the f32-activation kernels; quantized ones: quant_gemm (null)
    WeightView view;
    int64_t begin, end;
  };
  const CpuKernels& k = cpu_kernels();
  std::vector<Chunk> chunks;
  const int64_t n_chunks_wanted = static_cast<int64_t>(pool.size()) * 4;
  for (const MatmulJob& j : jobs) {
    const Matrix& w = *j.w;
    GemmFn fn = nullptr;
    switch (w.type) {
      case QuantType::F32: fn = k.gemm_f32; break;
      case QuantType::BF16: fn = k.gemm_bf16; break;
      case QuantType::F16: fn = k.gemm_f16; break;
      default: break;
    }
    int64_t chunk = (w.rows + n_chunks_wanted - 1) / n_chunks_wanted;
    chunk = std::max<int64_t>(16, (chunk + 15) / 16 * 16);
    const WeightView view{w.type, w.double_quant, w.rows, w.cols, w.data, w.row_bytes()};
    for (int64_t b = 0; b < w.rows; b += chunk) chunks.push_back({&j, fn, view, b, std::min(w.rows, b + chunk)});
  }
  const uint64_t x_key = new_activation_key();  // chunks on one thread quantize x once
  pool.parallel_for(chunks.size(), [&](size_t ci) {
    const Chunk& c = chunks[ci];
    const Matrix& w = *c.job->w;
    if (c.fn != nullptr) {
      c.fn(x, w.cols, n_tokens, w.data, c.view.row_bytes, w.cols, c.begin, c.end, c.job->y, w.rows);
    } else {
      quant_gemm_chunk(x, w.cols, n_tokens, c.view, c.begin, c.end, c.job->y, w.rows, x_key);
    }
  });
}

}  // namespace

void matmul(const float* x, int64_t n_tokens, const Matrix& w, float* y, ThreadPool& pool) {
  if (w.type == QuantType::INT8 && w.outlier_threshold > 0.0f) {
    const std::vector<int64_t> outliers = outlier_columns(x, n_tokens, w.cols, w.outlier_threshold);
    if (!outliers.empty()) {
      // LLM.int8: the outlier features are taken out of the int8 product and added back in f32.
      std::vector<float> inliers(x, x + n_tokens * w.cols);
      for (int64_t t = 0; t < n_tokens; ++t)
        for (int64_t c : outliers) inliers[static_cast<size_t>(t * w.cols + c)] = 0.0f;
      Matrix plain_int8 = w;
      plain_int8.outlier_threshold = 0.0f;
      matmul(inliers.data(), n_tokens, plain_int8, y, pool);
      const size_t rb = w.row_bytes();
      pool.parallel_for(static_cast<size_t>(w.rows), [&](size_t o) {
        const uint8_t* row = w.data + o * rb;
        float absmax;
        std::memcpy(&absmax, row, sizeof absmax);
        const int8_t* q = reinterpret_cast<const int8_t*>(row + sizeof absmax);
        const float scale = absmax / 127.0f;
        for (int64_t t = 0; t < n_tokens; ++t) {
          float sum = 0.0f;
          for (int64_t c : outliers) sum += x[t * w.cols + c] * (static_cast<float>(q[c]) * scale);
          y[static_cast<size_t>(t) * static_cast<size_t>(w.rows) + o] += sum;
        }
      });
      return;
    }
  }
  const MatmulJob job{&w, y};
  run_matmuls(x, n_tokens, std::span<const MatmulJob>(&job, 1), pool);
}

void matmul_group(const float* x, int64_t n_tokens, std::span<const MatmulJob> jobs, ThreadPool& pool) {
  std::vector<MatmulJob> plain;
  plain.reserve(jobs.size());
  for (const MatmulJob& j : jobs) {
    if (j.w->type == QuantType::INT8 && j.w->outlier_threshold > 0.0f) {
      matmul(x, n_tokens, *j.w, j.y, pool);  // the outlier path has passes of its own
    } else {
      plain.push_back(j);
    }
  }
  run_matmuls(x, n_tokens, plain, pool);
}

}  // namespace bioquant
