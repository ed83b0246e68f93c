// Quantized matmul throughput, single thread, every format x every ISA:
//   GEMV (1 token) on a 32768 x 4096 matrix (256 MiB as bf16, 72 MiB as 4-bit: past a 32 MiB L3 even
//   at 4 bits, like decode);
//   GEMM (64 tokens) on a 1B-model-sized projection (5632 x 2048).
// bytes_per_second counts weight bytes as stored (the decode roofline); FLOP/s counts 2 per weight
// per token. bf16 rows are the baseline (the same kernels bench/kernels_bench.cpp times).
#include <benchmark/benchmark.h>

#include <map>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "bioquant/quant/quant.h"

namespace {

using bioquant::QuantType;

struct Format {
  QuantType type;
  bool double_quant;
  const char* name;
};
const Format kFormats[] = {{QuantType::BF16, false, "bf16"}, {QuantType::Q8_0, false, "q8_0"},
                           {QuantType::Q6_K, false, "q6_k"}, {QuantType::Q5_K, false, "q5_k"},
                           {QuantType::Q4_K, false, "q4_k"}, {QuantType::Q4_0, false, "q4_0"},
                           {QuantType::INT8, false, "int8"}, {QuantType::NF4, false, "nf4"},
                           {QuantType::NF4, true, "nf4+dq"}, {QuantType::FP4, false, "fp4"}};
const char* const kIsas[] = {"scalar", "avx2", "avx512"};

struct Matrix {
  std::vector<uint8_t> bytes;
  bioquant::WeightView view;
};

// Quantized once per (format, shape) and kept for every benchmark that uses it.
const Matrix& matrix(int format, int64_t rows, int64_t cols) {
  static std::map<std::tuple<int, int64_t, int64_t>, std::unique_ptr<Matrix>> cache;
  auto& slot = cache[{format, rows, cols}];
  if (!slot) {
    const Format& f = kFormats[format];
    slot = std::make_unique<Matrix>();
    const size_t rb = bioquant::quant_row_bytes(f.type, cols, f.double_quant);
    slot->bytes.resize(rb * static_cast<size_t>(rows));
    std::mt19937 rng(42);
    std::normal_distribution<float> normal(0.0f, 0.02f);
    std::vector<float> row(static_cast<size_t>(cols));
    for (int64_t r = 0; r < rows; ++r) {
      if (r < 64) {  // 64 distinct rows, repeated (quantizing 64M values with the K-quant search is slow)
        for (float& v : row) v = normal(rng);
        bioquant::quantize_row(f.type, row.data(), cols, slot->bytes.data() + rb * r, f.double_quant);
      } else {
        std::copy_n(slot->bytes.data() + rb * (r % 64), rb, slot->bytes.data() + rb * r);
      }
    }
    slot->view = bioquant::WeightView{f.type, f.double_quant, rows, cols, slot->bytes.data(), rb};
  }
  return *slot;
}

void BM_QuantGemm(benchmark::State& state) {
  const int format = static_cast<int>(state.range(0));
  const char* isa = kIsas[state.range(1)];
  const int64_t tokens = state.range(2);
  const int64_t rows = tokens == 1 ? 32768 : 5632, cols = tokens == 1 ? 4096 : 2048;
  const Matrix& m = matrix(format, rows, cols);
  std::vector<float> x(static_cast<size_t>(tokens * cols), 0.5f), y(static_cast<size_t>(tokens * rows));
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(static_cast<int>(i % 17) - 8) * 0.125f;
  if (!bioquant::quant_gemm_isa(isa, x.data(), cols, tokens, m.view, 0, rows, y.data(), rows)) {
    state.SkipWithError("ISA not available on this CPU");
    return;
  }
  for (auto _ : state) {
    bioquant::quant_gemm_isa(isa, x.data(), cols, tokens, m.view, 0, rows, y.data(), rows);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.SetLabel(std::string(kFormats[format].name) + "/" + isa);
  const double iterations = static_cast<double>(state.iterations());
  state.SetBytesProcessed(static_cast<int64_t>(iterations * static_cast<double>(m.bytes.size())));
  state.counters["FLOP/s"] =
      benchmark::Counter(2.0 * static_cast<double>(rows * cols * tokens) * iterations, benchmark::Counter::kIsRate);
  state.counters["bits/w"] = 8.0 * static_cast<double>(m.view.row_bytes) / static_cast<double>(cols);
}
BENCHMARK(BM_QuantGemm)
    ->ArgNames({"fmt", "isa", "tokens"})
    ->ArgsProduct({benchmark::CreateDenseRange(0, 9, 1), {0, 1, 2}, {1, 64}})
    ->Unit(benchmark::kMillisecond);

}  // namespace
