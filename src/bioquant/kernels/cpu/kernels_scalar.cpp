// Plain C++ kernels: the reference the SIMD paths are tested against, and the fallback.
#include <cstdint>
#include <cstring>

#include "bioquant/core/half.h"
#include "bioquant/kernels/cpu/cpu_kernels.h"

namespace bioquant {
namespace {

float scalar_bf16(uint16_t h) { return bf16_to_f32(h); }
float scalar_f16(uint16_t h) { return f16_to_f32(h); }

struct V {
  using Reg = float;
  static constexpr int kWidth = 1;
  static constexpr int kTileRows = 1;
  static constexpr int kTileTokens = 1;
  static Reg zero() { return 0.0f; }
  static Reg broadcast(float a) { return a; }
  static Reg load_f32(const float* p) { return *p; }
  static Reg load_bf16(const uint16_t* p) { return bf16_to_f32(*p); }
  static Reg load_f16(const uint16_t* p) { return f16_to_f32(*p); }
  static void store_f32(float* p, Reg v) { *p = v; }
  static Reg fma(Reg a, Reg b, Reg c) { return a * b + c; }
  static Reg add(Reg a, Reg b) { return a + b; }
  static float hsum(Reg a) { return a; }
};

#include "bioquant/kernels/cpu/gemm_impl.h"

}  // namespace

const CpuKernels& scalar_kernels() {
  static const CpuKernels k{"scalar", gemm_f32, gemm_bf16, gemm_f16, dot, axpy, sum_read};
  return k;
}

}  // namespace bioquant
