// Every SIMD kernel set against the scalar reference, on ragged shapes.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <random>
#include <thread>

#include "bioquant/core/half.h"
#include "bioquant/core/thread_pool.h"
#include "bioquant/kernels/cpu/cpu_kernels.h"
#include "bioquant/kernels/cpu/matmul.h"

namespace bioquant {
namespace {

std::vector<uint8_t> random_weights(DType dtype, int64_t rows, int64_t cols, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<uint8_t> bytes(static_cast<size_t>(rows * cols) * dtype_size(dtype));
  for (int64_t i = 0; i < rows * cols; ++i) {
    const float v = normal(rng);
    if (dtype == DType::F32) reinterpret_cast<float*>(bytes.data())[i] = v;
    if (dtype == DType::BF16) reinterpret_cast<uint16_t*>(bytes.data())[i] = f32_to_bf16(v);
    if (dtype == DType::F16) reinterpret_cast<uint16_t*>(bytes.data())[i] = f32_to_f16(v);
  }
  return bytes;
}

GemmFn pick(const CpuKernels& k, DType dtype) {
  return dtype == DType::F32 ? k.gemm_f32 : dtype == DType::BF16 ? k.gemm_bf16 : k.gemm_f16;
}

TEST(Kernels, EveryIsaMatchesScalarGemmOnRaggedShapes) {
  std::mt19937 rng(7);
  const auto sets = available_cpu_kernels();
  ASSERT_EQ(std::string(sets.front()->isa), "scalar");
  const int64_t shapes[][3] = {{1, 1, 1}, {1, 37, 5}, {3, 64, 16}, {5, 100, 33}, {7, 129, 70}, {70, 48, 9}, {2, 2048, 4}};
  for (DType dtype : {DType::F32, DType::BF16, DType::F16}) {
    for (const auto& s : shapes) {
      const int64_t n = s[0], k = s[1], rows = s[2];
      const auto w = random_weights(dtype, rows, k, rng);
      std::vector<float> x(static_cast<size_t>(n * k));
      std::normal_distribution<float> normal(0.0f, 1.0f);
      for (float& v : x) v = normal(rng);
      std::vector<float> ref(static_cast<size_t>(n * rows));
      const size_t rb = static_cast<size_t>(k) * dtype_size(dtype);
      pick(scalar_kernels(), dtype)(x.data(), k, n, w.data(), rb, k, 0, rows, ref.data(), rows);
      for (const CpuKernels* set : sets) {
        std::vector<float> y(ref.size(), -1.0f);
        // Two row ranges, as the thread split would do.
        pick(*set, dtype)(x.data(), k, n, w.data(), rb, k, 0, rows / 2, y.data(), rows);
        pick(*set, dtype)(x.data(), k, n, w.data(), rb, k, rows / 2, rows, y.data(), rows);
        for (size_t i = 0; i < y.size(); ++i) {
          ASSERT_NEAR(y[i], ref[i], 1e-4f * std::sqrt(static_cast<float>(k)) * (1.0f + std::fabs(ref[i])))
              << set->isa << " dtype " << dtype_name(dtype) << " n=" << n << " k=" << k << " rows=" << rows << " i=" << i;
        }
      }
    }
  }
}

TEST(Kernels, DotAndAxpyMatchScalar) {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int64_t n : {1, 7, 16, 31, 64, 129}) {
    std::vector<float> a(n), b(n);
    for (auto& v : a) v = normal(rng);
    for (auto& v : b) v = normal(rng);
    const float ref = scalar_kernels().dot(a.data(), b.data(), n);
    for (const CpuKernels* set : available_cpu_kernels()) {
      EXPECT_NEAR(set->dot(a.data(), b.data(), n), ref, 1e-4f * n) << set->isa;
      std::vector<float> y = b, y_ref = b;
      set->axpy(0.5f, a.data(), y.data(), n);
      scalar_kernels().axpy(0.5f, a.data(), y_ref.data(), n);
      for (int64_t i = 0; i < n; ++i) EXPECT_FLOAT_EQ(y[i], y_ref[i]) << set->isa;
    }
  }
}

TEST(Kernels, ThreadedMatmulEqualsSingleThread) {
  std::mt19937 rng(11);
  const int64_t n = 9, k = 96, rows = 333;
  const auto w = random_weights(DType::BF16, rows, k, rng);
  std::vector<float> x(static_cast<size_t>(n * k));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (float& v : x) v = normal(rng);
  const Matrix m = Matrix::plain(DType::BF16, rows, k, w.data());
  std::vector<float> y1(static_cast<size_t>(n * rows)), y4(y1.size());
  ThreadPool one(1), four(4);
  matmul(x.data(), n, m, y1.data(), one);
  matmul(x.data(), n, m, y4.data(), four);
  EXPECT_EQ(y1, y4);  // the split changes which thread computes a row, never the arithmetic
}

// q/k/v and gate/up go through one parallel loop; each result must equal its own matmul bit for
// bit, for plain and quantized formats and for int8 with its outlier pass.
TEST(Kernels, GroupedMatmulsEqualSeparateOnes) {
  std::mt19937 rng(12);
  const int64_t k = 512;
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const auto plain = random_weights(DType::F32, 80, k, rng);
  std::vector<std::vector<uint8_t>> storage;
  std::vector<Matrix> mats = {Matrix::plain(DType::F32, 80, k, plain.data())};
  const QuantType types[] = {QuantType::Q4_K, QuantType::NF4, QuantType::Q8_0, QuantType::INT8};
  const int64_t rows_of[] = {48, 200, 17, 33};
  for (int i = 0; i < 4; ++i) {
    const size_t rb = quant_row_bytes(types[i], k, false);
    storage.emplace_back(rb * static_cast<size_t>(rows_of[i]));
    std::vector<float> row(static_cast<size_t>(k));
    for (int64_t r = 0; r < rows_of[i]; ++r) {
      for (float& v : row) v = normal(rng);
      quantize_row(types[i], row.data(), k, storage.back().data() + rb * static_cast<size_t>(r), false);
    }
    mats.push_back(Matrix{types[i], rows_of[i], k, storage.back().data(), false});
  }
  mats.back().outlier_threshold = 3.0f;
  for (const int64_t n : {int64_t{1}, int64_t{7}}) {
    std::vector<float> x(static_cast<size_t>(n * k));
    for (float& v : x) v = normal(rng);
    x[5] = 9.0f;  // an outlier feature for the int8 matrix
    ThreadPool pool(3);
    std::vector<std::vector<float>> alone, grouped;
    std::vector<MatmulJob> jobs;
    for (const Matrix& m : mats) {
      alone.emplace_back(static_cast<size_t>(n * m.rows));
      grouped.emplace_back(static_cast<size_t>(n * m.rows), -1.0f);
      matmul(x.data(), n, m, alone.back().data(), pool);
    }
    for (size_t i = 0; i < mats.size(); ++i) jobs.push_back({&mats[i], grouped[i].data()});
    matmul_group(x.data(), n, jobs, pool);
    for (size_t i = 0; i < mats.size(); ++i) EXPECT_EQ(alone[i], grouped[i]) << mats[i].type_name() << " n=" << n;
  }
}

// The pool spins between loops and sleeps when idle: loops right after each other, loops after the
// workers fell asleep, and more threads than cores must all run every task exactly once.
TEST(ThreadPool, RunsEveryTaskOnceWhetherWorkersSpinOrSleep) {
  ThreadPool pool(5);
  std::vector<std::atomic<int>> hits(1000);
  for (int round = 0; round < 300; ++round) {
    const size_t n = static_cast<size_t>(1 + (round * 37) % 1000);
    pool.parallel_for(n, [&](size_t i) { hits[i].fetch_add(1, std::memory_order_relaxed); });
    if (round % 100 == 99) std::this_thread::sleep_for(std::chrono::milliseconds(5));  // let them sleep
  }
  std::vector<int> expected(1000, 0);
  for (int round = 0; round < 300; ++round)
    for (size_t i = 0; i < static_cast<size_t>(1 + (round * 37) % 1000); ++i) ++expected[i];
  for (size_t i = 0; i < hits.size(); ++i) ASSERT_EQ(hits[i].load(), expected[i]) << i;
}

TEST(Half, RoundTripsAndRoundsToNearestEven) {
  EXPECT_EQ(f32_to_bf16(1.0f), 0x3f80);
  EXPECT_EQ(bf16_to_f32(0x3f80), 1.0f);
  EXPECT_EQ(f32_to_bf16(1.00390625f), 0x3f80);  // exactly halfway: ties to even
  EXPECT_EQ(f32_to_bf16(1.01171875f), 0x3f82);  // halfway above odd: rounds up
  EXPECT_EQ(f32_to_f16(1.0f), 0x3c00);
  EXPECT_EQ(f32_to_f16(65504.0f), 0x7bff);
  EXPECT_EQ(f32_to_f16(70000.0f), 0x7c00);
  EXPECT_EQ(f32_to_f16(-2.0f), 0xc000);
  EXPECT_EQ(f32_to_f16(5.960464477539063e-08f), 0x0001);  // smallest subnormal
  EXPECT_EQ(f16_to_f32(0x0001), 5.960464477539063e-08f);
  EXPECT_EQ(f16_to_f32(0x3555), 0.333251953125f);
  for (uint32_t h = 0; h < 0x7c00; ++h) {  // every finite non-negative half survives a round trip
    ASSERT_EQ(f32_to_f16(f16_to_f32(static_cast<uint16_t>(h))), h);
  }
}

}  // namespace
}  // namespace bioquant

namespace bioquant {
namespace {

// LLM.int8's decomposition: a huge activation in one feature ruins the int8 activation scale of its
// block; taking that feature out (f32) and the rest through int8 restores the accuracy.
TEST(Kernels, Int8OutlierDecompositionKeepsAccuracy) {
  std::mt19937 rng(21);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t rows = 40, cols = 256, tokens = 3;
  std::vector<float> wf(static_cast<size_t>(rows * cols));
  for (float& v : wf) v = normal(rng) * 0.05f;
  const size_t rb = quant_row_bytes(QuantType::INT8, cols);
  std::vector<uint8_t> wq(rb * static_cast<size_t>(rows));
  std::vector<float> deq(wf.size());
  for (int64_t r = 0; r < rows; ++r) {
    quantize_row(QuantType::INT8, wf.data() + r * cols, cols, wq.data() + r * rb);
    dequantize_row(QuantType::INT8, wq.data() + r * rb, cols, deq.data() + r * cols);
  }
  std::vector<float> x(static_cast<size_t>(tokens * cols));
  for (float& v : x) v = normal(rng) * 0.3f;
  x[17] = 60.0f;               // token 0, feature 17: an outlier
  x[cols + 200] = -45.0f;      // token 1, feature 200
  Matrix m{QuantType::INT8, rows, cols, wq.data(), false};
  ThreadPool pool(2);
  auto max_err = [&](float threshold) {
    m.outlier_threshold = threshold;
    std::vector<float> y(static_cast<size_t>(tokens * rows));
    matmul(x.data(), tokens, m, y.data(), pool);
    double worst = 0;
    for (int64_t t = 0; t < tokens; ++t)
      for (int64_t o = 0; o < rows; ++o) {
        double exact = 0;
        for (int64_t k = 0; k < cols; ++k) exact += static_cast<double>(x[t * cols + k]) * deq[o * cols + k];
        worst = std::max(worst, std::fabs(exact - y[t * rows + o]));
      }
    return worst;
  };
  const double without = max_err(0.0f), with = max_err(6.0f);
  EXPECT_LT(with, 0.01);           // only the inlier activations' int8 rounding remains
  EXPECT_GT(without, 5.0 * with);  // the outliers' block scale costs far more
}

}  // namespace
}  // namespace bioquant
