// AVX-512 (F/BW/VL) kernels. Compiled with those flags only; chosen at run time.
#include <immintrin.h>

#include <cstdint>

#include "bioquant/kernels/cpu/cpu_kernels.h"

namespace bioquant {
namespace {

float scalar_bf16(uint16_t h) { return _mm_cvtss_f32(_mm_castsi128_ps(_mm_cvtsi32_si128(static_cast<int>(h) << 16))); }
float scalar_f16(uint16_t h) { return _cvtsh_ss(h); }

struct V {
  using Reg = __m512;
  static constexpr int kWidth = 16;
  static constexpr int kTileRows = 4;
  static constexpr int kTileTokens = 4;
  static Reg zero() { return _mm512_setzero_ps(); }
  static Reg broadcast(float a) { return _mm512_set1_ps(a); }
  static Reg load_f32(const float* p) { return _mm512_loadu_ps(p); }
  static Reg load_bf16(const uint16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static Reg load_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static void store_f32(float* p, Reg v) { _mm512_storeu_ps(p, v); }
  static Reg fma(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
  static Reg add(Reg a, Reg b) { return _mm512_add_ps(a, b); }
  static float hsum(Reg a) { return _mm512_reduce_add_ps(a); }
};

#include "bioquant/kernels/cpu/gemm_impl.h"

}  // namespace

const CpuKernels& avx512_kernels() {
  static const CpuKernels k{"avx512", gemm_f32, gemm_bf16, gemm_f16, dot, axpy, sum_read};
  return k;
}

}  // namespace bioquant
