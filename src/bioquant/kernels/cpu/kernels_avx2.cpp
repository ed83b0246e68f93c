// AVX2 + FMA + F16C kernels. Compiled with those flags only; chosen at run time.
#include <immintrin.h>

#include <cstdint>

#include "bioquant/kernels/cpu/cpu_kernels.h"

namespace bioquant {
namespace {

float scalar_bf16(uint16_t h) { return _mm_cvtss_f32(_mm_castsi128_ps(_mm_cvtsi32_si128(static_cast<int>(h) << 16))); }
float scalar_f16(uint16_t h) { return _cvtsh_ss(h); }

struct V {
  using Reg = __m256;
  static constexpr int kWidth = 8;
  static constexpr int kTileRows = 4;
  static constexpr int kTileTokens = 2;
  static Reg zero() { return _mm256_setzero_ps(); }
  static Reg broadcast(float a) { return _mm256_set1_ps(a); }
  static Reg load_f32(const float* p) { return _mm256_loadu_ps(p); }
  static Reg load_bf16(const uint16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static Reg load_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static void store_f32(float* p, Reg v) { _mm256_storeu_ps(p, v); }
  static Reg fma(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
  static Reg add(Reg a, Reg b) { return _mm256_add_ps(a, b); }
  static float hsum(Reg a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

#include "bioquant/kernels/cpu/gemm_impl.h"

}  // namespace

const CpuKernels& avx2_kernels() {
  static const CpuKernels k{"avx2", gemm_f32, gemm_bf16, gemm_f16, dot, axpy, sum_read};
  return k;
}

}  // namespace bioquant
