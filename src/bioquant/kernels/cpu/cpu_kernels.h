// CPU kernels behind one table, chosen once per process by the CPU's instruction sets
// (AVX-512 > AVX2+FMA+F16C > scalar). BIOQUANT_CPU_ISA=scalar|avx2|avx512 pins a path,
// so tests can exercise every one on a machine that has them all.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace bioquant {

// Y[t*ldy + o] = sum_k X[t*ldx + k] * W_o[k], for t in [0, n_tokens) and o in [row_begin, row_end).
// W_o is row o of a row-major weight matrix whose rows are row_bytes apart; K elements per row.
using GemmFn = void (*)(const float* x, int64_t ldx, int64_t n_tokens, const uint8_t* w, size_t row_bytes,
                        int64_t k, int64_t row_begin, int64_t row_end, float* y, int64_t ldy);

struct CpuKernels {
  const char* isa;
  GemmFn gemm_f32;
  GemmFn gemm_bf16;
  GemmFn gemm_f16;
  float (*dot)(const float* a, const float* b, int64_t n);
  void (*axpy)(float alpha, const float* x, float* y, int64_t n);  // y += alpha * x
  double (*sum_read)(const float* data, int64_t n);                 // streams memory (bandwidth probe)
};

// The kernels this process uses (environment override honoured; unknown or unsupported
// override names throw Error).
const CpuKernels& cpu_kernels();

// Every kernel set this CPU can run, best last ("scalar" always first).
std::vector<const CpuKernels*> available_cpu_kernels();

// Per-ISA tables (defined in one translation unit each, compiled with that ISA's flags).
const CpuKernels& scalar_kernels();
const CpuKernels& avx2_kernels();
const CpuKernels& avx512_kernels();

}  // namespace bioquant
