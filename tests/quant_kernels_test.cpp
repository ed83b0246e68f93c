// Quantized matmul: the scalar reference against the dequantized weights, then every ISA kernel
// against the scalar reference on ragged shapes, for every format.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "bioquant/core/error.h"
#include "bioquant/kernels/cpu/cpu_kernels.h"
#include "bioquant/quant/quant.h"

namespace bioquant {
namespace {

struct Format {
  QuantType type;
  bool double_quant;
};

const Format kFormats[] = {{QuantType::Q8_0, false}, {QuantType::Q4_0, false}, {QuantType::Q4_K, false},
                           {QuantType::Q5_K, false}, {QuantType::Q6_K, false}, {QuantType::INT8, false},
                           {QuantType::NF4, false},  {QuantType::FP4, false},  {QuantType::NF4, true},
                           {QuantType::FP4, true},   {QuantType::F32, false},  {QuantType::F16, false},
                           {QuantType::BF16, false}};

std::string label(const Format& f) { return std::string(quant_traits(f.type).name) + (f.double_quant ? "+dq" : ""); }

bool integer_path(QuantType t) { return t != QuantType::F32 && t != QuantType::F16 && t != QuantType::BF16; }
bool bnb4(QuantType t) { return t == QuantType::NF4 || t == QuantType::FP4; }

struct Matrix {
  std::vector<uint8_t> bytes;
  std::vector<float> deq;  // dequantized, rows x cols
  WeightView view;
};

Matrix make_matrix(const Format& f, int64_t rows, int64_t cols, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Matrix m;
  const size_t rb = quant_row_bytes(f.type, cols, f.double_quant);
  m.bytes.resize(rb * static_cast<size_t>(rows));
  m.deq.resize(static_cast<size_t>(rows * cols));
  std::vector<float> w(static_cast<size_t>(cols));
  for (int64_t r = 0; r < rows; ++r) {
    for (float& v : w) v = normal(rng) * 0.05f;
    w[static_cast<size_t>(r % cols)] += 0.5f;  // an outlier per row
    quantize_row(f.type, w.data(), cols, m.bytes.data() + rb * r, f.double_quant);
    dequantize_row(f.type, m.bytes.data() + rb * r, cols, m.deq.data() + r * cols, f.double_quant);
  }
  m.view = WeightView{f.type, f.double_quant, rows, cols, m.bytes.data(), rb};
  return m;
}

// The activations as the integer kernels see them: per 32, d = absmax/127, q = rint(x/d).
std::vector<float> quantized_activation_halfsteps(const float* x, int64_t cols) {
  std::vector<float> half(static_cast<size_t>(cols));
  for (int64_t b = 0; b * 32 < cols; ++b) {
    float amax = 0.0f;
    for (int64_t i = 32 * b; i < cols && i < 32 * b + 32; ++i) amax = std::fmax(amax, std::fabs(x[i]));
    for (int64_t i = 32 * b; i < cols && i < 32 * b + 32; ++i) half[static_cast<size_t>(i)] = amax / 127.0f / 2.0f;
  }
  return half;
}

TEST(QuantKernels, ReferenceMatchesDequantizedWeightsWithinActivationRounding) {
  // The reference computes sum_k W_k xq_k exactly (integers) up to float scaling, where xq_k is the
  // activation rounded to its block's grid: |xq_k - x_k| <= d_b/2. So
  // |y_ref - sum_k W_k x_k| <= sum_k |W_k| d_b(k)/2, plus float rounding (1e-5 relative).
  // nf4/fp4 take the codebook in Q1.14: each weight is off by at most absmax 2^-15, adding
  // sum_k absmax_(k/64) 2^-15 (|x_k| + d_b(k)/2).
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (const Format& f : kFormats) {
    const int64_t cols = quant_traits(f.type).block_elems >= 256 ? 512 : 192;
    const int64_t rows = 9, n = 3;
    const Matrix m = make_matrix(f, rows, cols, rng);
    std::vector<float> x(static_cast<size_t>(n * cols));
    for (float& v : x) v = normal(rng);
    std::vector<float> y(static_cast<size_t>(n * rows));
    quant_gemm_reference(x.data(), cols, n, m.view, 0, rows, y.data(), rows);
    for (int64_t t = 0; t < n; ++t) {
      const auto half = quantized_activation_halfsteps(&x[t * cols], cols);
      for (int64_t o = 0; o < rows; ++o) {
        double exact = 0.0, bound = 0.0, mag = 0.0;
        for (int64_t k = 0; k < cols; ++k) {
          const double wk = m.deq[o * cols + k], xk = x[t * cols + k];
          exact += wk * xk;
          mag += std::fabs(wk * xk);
          if (integer_path(f.type)) bound += std::fabs(wk) * half[k];
          if (bnb4(f.type)) {
            double absmax = 0.0;  // the +-1 code of the block's largest weight makes max |W| the stored absmax
            for (int64_t i = k / 64 * 64; i < k / 64 * 64 + 64; ++i) absmax = std::max(absmax, std::fabs(double(m.deq[o * cols + i])));
            bound += absmax / 32768.0 * (std::fabs(xk) + half[k]);
          }
        }
        EXPECT_NEAR(y[t * rows + o], exact, bound + 1e-5 * mag + 1e-6) << label(f) << " t=" << t << " o=" << o;
      }
    }
  }
}

TEST(QuantKernels, EveryIsaMatchesReferenceOnRaggedShapes) {
  std::mt19937 rng(17);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t token_counts[] = {1, 2, 3, 5, 8, 17};
  const int64_t row_counts[] = {1, 2, 5, 8, 13, 33, 70};
  int checked_isas = 0;
  for (const char* isa : {"scalar", "avx2", "avx512"}) {
    {
      // Probe availability with an empty call.
      const Format f{QuantType::Q8_0, false};
      Matrix m = make_matrix(f, 1, 32, rng);
      float xx[32] = {}, yy[1];
      if (!quant_gemm_isa(isa, xx, 32, 0, m.view, 0, 0, yy, 1)) continue;
    }
    ++checked_isas;
    for (const Format& f : kFormats) {
      const int64_t block = quant_traits(f.type).block_elems;
      std::vector<int64_t> col_choices;
      if (f.type == QuantType::INT8) col_choices = {32, 64, 96, 128, 7, 45, 100};
      else if (block <= 1) col_choices = {1, 17, 64, 100};
      else col_choices = {block, 2 * block, 3 * block, 4 * block};
      for (int64_t cols : col_choices) {
        for (int64_t rows : row_counts) {
          const int64_t n = token_counts[(cols + rows) % 6];
          const Matrix m = make_matrix(f, rows, cols, rng);
          const int64_t ldx = cols + 3, ldy = rows + 2;
          std::vector<float> x(static_cast<size_t>(n * ldx));
          for (float& v : x) v = normal(rng);
          if (rows == 13) std::fill(x.begin(), x.begin() + cols, 0.0f);  // an all-zero token
          std::vector<float> ref(static_cast<size_t>(n * ldy), -7.0f), y(ref.size(), -7.0f);
          quant_gemm_reference(x.data(), ldx, n, m.view, 0, rows, ref.data(), ldy);
          // Two row ranges, as a thread split would do.
          const int64_t mid = rows / 3;
          ASSERT_TRUE(quant_gemm_isa(isa, x.data(), ldx, n, m.view, 0, mid, y.data(), ldy));
          ASSERT_TRUE(quant_gemm_isa(isa, x.data(), ldx, n, m.view, mid, rows, y.data(), ldy));
          for (int64_t t = 0; t < n; ++t) {
            for (int64_t o = 0; o < ldy; ++o) {
              const size_t i = static_cast<size_t>(t * ldy + o);
              if (o >= rows) {
                ASSERT_EQ(y[i], -7.0f) << "wrote outside the row range";
                continue;
              }
              double mag = 0.0;
              for (int64_t k = 0; k < cols; ++k) mag += std::fabs(m.deq[o * cols + k] * x[t * ldx + k]);
              // Same integers, same scales: only f32 summation order differs. The integer kernels
              // fold offsets (8, 32, 128 x the activation sum) that can be a few times the result.
              ASSERT_NEAR(y[i], ref[i], 1e-4 * mag + 1e-5)
                  << isa << " " << label(f) << " cols=" << cols << " rows=" << rows << " n=" << n << " t=" << t << " o=" << o;
            }
          }
        }
      }
    }
  }
  EXPECT_GE(checked_isas, 1);
}

TEST(QuantKernels, LargeRowsMatchReference) {
  // Realistic row length: 4096 columns, decode and a 64-token prefill.
  std::mt19937 rng(23);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (const Format& f : kFormats) {
    const int64_t rows = 11, cols = 4096;
    const Matrix m = make_matrix(f, rows, cols, rng);
    for (int64_t n : {1, 64}) {
      std::vector<float> x(static_cast<size_t>(n * cols));
      for (float& v : x) v = normal(rng);
      std::vector<float> ref(static_cast<size_t>(n * rows)), y(ref.size());
      quant_gemm_reference(x.data(), cols, n, m.view, 0, rows, ref.data(), rows);
      quant_gemm(x.data(), cols, n, m.view, 0, rows, y.data(), rows);
      for (int64_t t = 0; t < n; ++t) {
        for (int64_t o = 0; o < rows; ++o) {
          double mag = 0.0;
          for (int64_t k = 0; k < cols; ++k) mag += std::fabs(m.deq[o * cols + k] * x[t * cols + k]);
          ASSERT_NEAR(y[t * rows + o], ref[t * rows + o], 1e-4 * mag + 1e-5) << label(f) << " n=" << n;
        }
      }
    }
  }
}

TEST(QuantKernels, DoubleQuantRowsWithSeveralNestedGroups) {
  // 320 blocks of 64: nested absmax groups of 256 and 64 blocks.
  std::mt19937 rng(29);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (QuantType t : {QuantType::NF4, QuantType::FP4}) {
    const Format f{t, true};
    const int64_t rows = 5, cols = 320 * 64;
    const Matrix m = make_matrix(f, rows, cols, rng);
    for (int64_t n : {1, 7}) {
      std::vector<float> x(static_cast<size_t>(n * cols));
      for (float& v : x) v = normal(rng);
      std::vector<float> ref(static_cast<size_t>(n * rows)), y(ref.size());
      quant_gemm_reference(x.data(), cols, n, m.view, 0, rows, ref.data(), rows);
      for (const char* isa : {"avx2", "avx512"}) {
        if (!quant_gemm_isa(isa, x.data(), cols, n, m.view, 0, rows, y.data(), rows)) continue;
        for (int64_t t = 0; t < n; ++t) {
          for (int64_t o = 0; o < rows; ++o) {
            double mag = 0.0;
            for (int64_t k = 0; k < cols; ++k) mag += std::fabs(m.deq[o * cols + k] * x[t * cols + k]);
            ASSERT_NEAR(y[t * rows + o], ref[t * rows + o], 1e-4 * mag + 1e-5) << isa << " " << label(f) << " n=" << n;
          }
        }
      }
    }
  }
}

TEST(QuantKernels, PlainTypesForwardToCpuKernels) {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t rows = 6, cols = 40, n = 2;
  std::vector<float> w(rows * cols), x(n * cols);
  for (float& v : w) v = normal(rng);
  for (float& v : x) v = normal(rng);
  WeightView view{QuantType::F32, false, rows, cols, reinterpret_cast<const uint8_t*>(w.data()), cols * sizeof(float)};
  std::vector<float> y(n * rows), ref(n * rows);
  quant_gemm(x.data(), cols, n, view, 0, rows, y.data(), rows);
  cpu_kernels().gemm_f32(x.data(), cols, n, view.data, view.row_bytes, cols, 0, rows, ref.data(), rows);
  for (size_t i = 0; i < y.size(); ++i) EXPECT_EQ(y[i], ref[i]);
}

TEST(QuantKernels, IsaNamesAndBadArguments) {
  const std::string isa = quant_gemm_isa_name();
  EXPECT_TRUE(isa == "scalar" || isa == "avx2" || isa == "avx512") << isa;
  std::vector<uint8_t> bytes(quant_row_bytes(QuantType::Q4_0, 64) * 2);
  std::vector<float> x(64), y(2);
  const WeightView w{QuantType::Q4_0, false, 2, 64, bytes.data(), quant_row_bytes(QuantType::Q4_0, 64)};
  EXPECT_FALSE(quant_gemm_isa("sse9", x.data(), 64, 1, w, 0, 2, y.data(), 2));
  EXPECT_TRUE(quant_gemm_isa("scalar", x.data(), 64, 1, w, 0, 2, y.data(), 2));
  EXPECT_THROW(quant_gemm(x.data(), 64, 1, w, 0, 3, y.data(), 2), Error);  // rows out of range
  EXPECT_THROW(quant_gemm(x.data(), 64, 1, w, 1, 0, y.data(), 2), Error);
  WeightView short_rows = w;
  short_rows.row_bytes = 10;
  EXPECT_THROW(quant_gemm(x.data(), 64, 1, short_rows, 0, 2, y.data(), 2), Error);
  WeightView bad_cols = w;
  bad_cols.cols = 48;
  EXPECT_THROW(quant_gemm(x.data(), 64, 1, bad_cols, 0, 2, y.data(), 2), Error);
  WeightView dq = w;
  dq.double_quant = true;
  EXPECT_THROW(quant_gemm(x.data(), 64, 1, dq, 0, 2, y.data(), 2), Error);
  EXPECT_THROW(quant_gemm(x.data(), 32, 1, w, 0, 2, y.data(), 2), Error);  // ldx < cols
}

}  // namespace
}  // namespace bioquant
