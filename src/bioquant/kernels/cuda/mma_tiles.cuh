// The int8 tensor-core (mma.sync) building blocks of the batched matmul kernels: the fragments,
// the tokens a lane serves, the tile's prologue and the warps' partial sums.
// Part of the CUDA backend's single translation unit: included by gpu_decoder.cu (directly or through
// the files it includes) and nowhere else, so its definitions share that file's anonymous namespace.
#pragma once

#include <cstdint>

#include "bioquant/kernels/cuda/qmatvec_kernels.cuh"

namespace bioquant {
namespace {

// Fragments (PTX ISA, m16n8k32 .s8): lane (g, t) = (lane / 4, lane % 4) holds A's rows g and g + 8
// at k = 4t..4t+3 (a0, a1) and 16+4t..16+4t+3 (a2, a3), B's column g at the same k (b0, b1), and C's
// rows g and g + 8 at columns 2t and 2t + 1. The order of k inside one mma is free when A and B
// agree, so each kernel picks the one its blocks load best.
constexpr int kMmaRows = 16;
constexpr int kMmaTileTokens = 8;
// D = A * B + C, with C given as four values (a chain of mma) or one value for all four.
__device__ __forceinline__ void mma_s8_m16n8k32(int (&dst)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                uint32_t b0, uint32_t b1, const int (&c)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};"
      : "=r"(dst[0]), "=r"(dst[1]), "=r"(dst[2]), "=r"(dst[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "r"(c[0]), "r"(c[1]), "r"(c[2]), "r"(c[3]));
#else
  dst[0] = dst[1] = dst[2] = dst[3] = 0;  // the host pass (the device code is built for sm_80 and up)
  (void)a0, (void)a1, (void)a2, (void)a3, (void)b0, (void)b1, (void)c;
#endif
}
__device__ __forceinline__ void mma_s8_m16n8k32(int (&dst)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                uint32_t b0, uint32_t b1, int start) {
  const int c[4] = {start, start, start, start};
  mma_s8_m16n8k32(dst, a0, a1, a2, a3, b0, b1, c);
}

// The end of the mma kernels: each warp's partial sums of the tile's 16 rows x 8 * NTILE tokens (C's
// layout: rows g, g + 8, tokens 8n + 2t, 8n + 2t + 1), added in warp order and stored.
template <int NTILE>
__device__ __forceinline__ void store_mma_partials(const float (&acc)[NTILE][4], float (*partial)[kMmaRows * 8 * NTILE],
                                                   int warp, int g, int t, int64_t n_tokens, float* y, int64_t rows,
                                                   int64_t row0) {
  constexpr int kTokens = 8 * NTILE;
#pragma unroll
  for (int n = 0; n < NTILE; ++n) {
    partial[warp][g * kTokens + 8 * n + 2 * t] = acc[n][0];
    partial[warp][g * kTokens + 8 * n + 2 * t + 1] = acc[n][1];
    partial[warp][(g + 8) * kTokens + 8 * n + 2 * t] = acc[n][2];
    partial[warp][(g + 8) * kTokens + 8 * n + 2 * t + 1] = acc[n][3];
  }
  __syncthreads();
  for (int i = static_cast<int>(threadIdx.x); i < kMmaRows * kTokens; i += static_cast<int>(blockDim.x)) {
    const int r = i % kMmaRows, tok = i / kMmaRows;
    if (tok < n_tokens) {
      float v = 0.0f;
#pragma unroll
      for (int w = 0; w < 8; ++w) v += partial[w][r * kTokens + tok];
      y[tok * rows + row0 + r] = v;
    }
  }
}

// The tokens lane (g, t) of an int8 mma kernel serves in each 8-token tile n: B's column g (token
// 8n + g: its int8 activations) and C's columns 2t and 2t + 1 (tokens 8n + 2t and 8n + 2t + 1: their
// scales, and their sums for formats with a minimum). Tokens past n_tokens: zero activations and
// scales, nothing loaded for them.
template <int NTILE>
struct MmaTokens {
  bool has_col[NTILE], has_c0[NTILE], has_c1[NTILE];
  const int8_t* xq[NTILE];
  const float *dx0[NTILE], *dx1[NTILE];
  const int *sx0[NTILE], *sx1[NTILE];  // null without s
  __device__ __forceinline__ MmaTokens(int g, int t, int64_t n_tokens, const int8_t* q, const float* d, const int* s,
                                       int64_t nblk) {
#pragma unroll
    for (int n = 0; n < NTILE; ++n) {
      const int col = 8 * n + g, c0 = 8 * n + 2 * t, c1 = c0 + 1;
      has_col[n] = col < n_tokens;
      has_c0[n] = c0 < n_tokens;
      has_c1[n] = c1 < n_tokens;
      const int64_t o0 = static_cast<int64_t>(has_c0[n] ? c0 : 0) * nblk, o1 = static_cast<int64_t>(has_c1[n] ? c1 : 0) * nblk;
      xq[n] = q + static_cast<int64_t>(has_col[n] ? col : 0) * nblk * 32;
      dx0[n] = d + o0;
      dx1[n] = d + o1;
      sx0[n] = s != nullptr ? s + o0 : nullptr;
      sx1[n] = s != nullptr ? s + o1 : nullptr;
    }
  }
  // Token 8n + g's activations [32 b + offset, + bytes) (zeros past n_tokens).
  __device__ __forceinline__ uint2 x8(int n, int64_t b, int offset) const {
    return has_col[n] ? *reinterpret_cast<const uint2*>(xq[n] + 32 * b + offset) : make_uint2(0u, 0u);
  }
  __device__ __forceinline__ uint32_t x4(int n, int64_t b, int offset) const {
    return has_col[n] ? *reinterpret_cast<const uint32_t*>(xq[n] + 32 * b + offset) : 0u;
  }
};

// The start of the int8 mma kernels (q4_k, q6_k, int8, q8_0): kTokens = 8 * NTILE tokens per pass, the warps'
// partial sums in shared memory, lane (g, t) of warp `warp`, the block's 16 rows located (every job's rows
// are a multiple of 16, so the whole block returns when it has none), wg / wg8 the starts of rows g and g + 8.
// A macro, not a helper: a struct holding the same values moved q4_k's kernel from 104 to 100 registers and
// cost it 2.5% with 8 sequences (H200, same call); the macro compiles to the same code as written out.
#define BQ_MMA_TILE_PROLOGUE(NTILE)                                                \
  allow_dependents_in_last_wave();                                                 \
  await_inputs();                                                                  \
  constexpr int kTokens = 8 * (NTILE);                                             \
  __shared__ float partial[8][kMmaRows * kTokens];                                 \
  const int warp = static_cast<int>(threadIdx.x / 32), lane = static_cast<int>(threadIdx.x % 32); \
  const int g = lane / 4, t = lane % 4;                                            \
  int64_t row0 = static_cast<int64_t>(blockIdx.x) * kMmaRows;                      \
  QJob job;                                                                        \
  if (!locate_row(jobs, row0, job)) return;                                        \
  const uint8_t* wg = job.w + (row0 + g) * job.row_bytes;                          \
  const uint8_t* wg8 = wg + 8 * job.row_bytes

// D = A * B for one k16 step (int8, m16n8k16): A's rows g and g + 8 at k = 4t..4t+3 (a0, a1), B's
// column g at the same k, C as the k32 form's.
__device__ __forceinline__ void mma_s8_m16n8k16(int (&dst)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%7, %7, %7, %7};"
      : "=r"(dst[0]), "=r"(dst[1]), "=r"(dst[2]), "=r"(dst[3])
      : "r"(a0), "r"(a1), "r"(b0), "r"(0));
#else
  dst[0] = dst[1] = dst[2] = dst[3] = 0;
  (void)a0, (void)a1, (void)b0;
#endif
}

}  // namespace
}  // namespace bioquant
