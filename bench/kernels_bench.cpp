// GEMV throughput on a 128 MiB bf16 matrix (far past the caches, like decode) and GEMM on a
// 1B-model-sized projection (2048 x 5632, 64 tokens), for every kernel set.
#include <benchmark/benchmark.h>

#include <vector>

#include "bioquant/core/half.h"
#include "bioquant/kernels/cpu/cpu_kernels.h"

namespace {

void BM_GemmBf16(benchmark::State& state) {
  const auto sets = bioquant::available_cpu_kernels();
  const size_t which = static_cast<size_t>(state.range(0));
  if (which >= sets.size()) {
    state.SkipWithError("kernel set not available on this CPU");
    return;
  }
  const bioquant::CpuKernels& k = *sets[which];
  const int64_t rows = state.range(1) == 1 ? 16384 : 5632, cols = state.range(1) == 1 ? 4096 : 2048, tokens = state.range(1);
  std::vector<uint16_t> w(static_cast<size_t>(rows * cols), bioquant::f32_to_bf16(0.01f));
  std::vector<float> x(static_cast<size_t>(tokens * cols), 1.0f), y(static_cast<size_t>(tokens * rows));
  for (auto _ : state) {
    k.gemm_bf16(x.data(), cols, tokens, reinterpret_cast<const uint8_t*>(w.data()), cols * 2, cols, 0, rows, y.data(),
                rows);
    benchmark::DoNotOptimize(y.data());
  }
  state.SetLabel(k.isa);
  const double iterations = static_cast<double>(state.iterations());
  state.SetBytesProcessed(static_cast<int64_t>(iterations * static_cast<double>(w.size() * 2)));  // weight bytes
  state.counters["FLOP/s"] = benchmark::Counter(2.0 * rows * cols * tokens * iterations, benchmark::Counter::kIsRate);
}
BENCHMARK(BM_GemmBf16)->ArgsProduct({{0, 1, 2}, {1, 64}})->Unit(benchmark::kMillisecond);

}  // namespace
