// Plain weights (f32, f16, bf16): matvecs and tensor-core passes; dequantization of quantized rows
// to bf16 for cuBLAS prompts.
// Part of the CUDA backend's single translation unit: included by gpu_decoder.cu (directly or through
// the files it includes) and nowhere else, so its definitions share that file's anonymous namespace.
#pragma once

#include <cuda_bf16.h>
#include <mma.h>

#include <cstddef>
#include <cstdint>

#include "bioquant/kernels/cuda/mma_tiles.cuh"
#include "bioquant/kernels/cuda/qmatvec_kernels.cuh"

namespace bioquant {
namespace {

// Plain weights (f32 / f16 / bf16) with f32 activations: one warp per row.
template <int T>
__device__ __forceinline__ float plain_at(const uint8_t* row, int64_t i) {
  if constexpr (T == static_cast<int>(QuantType::F32)) return reinterpret_cast<const float*>(row)[i];
  if constexpr (T == static_cast<int>(QuantType::F16))
    return __half2float(reinterpret_cast<const __half*>(row)[i]);
  return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(row)[i]);
}

// bf16 rows whose length is a multiple of 8: 16-byte loads (8 weights) per lane.
template <int NT>
__global__ void bf16_matmul_vec_kernel(const uint8_t* w, size_t row_bytes, int64_t rows, int64_t cols, const float* x,
                                       int64_t n_tokens, float* y) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const uint4* wr = reinterpret_cast<const uint4*>(w + row * row_bytes);
  float acc[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t] = 0.0f;
  for (int64_t g = lane; g < cols / 8; g += 32) {
    const uint4 pack = wr[g];
    const uint32_t u[4] = {pack.x, pack.y, pack.z, pack.w};
    float wv[8];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      wv[2 * k] = __uint_as_float(u[k] << 16);
      wv[2 * k + 1] = __uint_as_float(u[k] & 0xFFFF0000u);
    }
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      if (t >= n_tokens) break;
      const float4* xv = reinterpret_cast<const float4*>(x + t * cols + 8 * g);
      const float4 a = xv[0], b = xv[1];
      acc[t] += wv[0] * a.x + wv[1] * a.y + wv[2] * a.z + wv[3] * a.w + wv[4] * b.x + wv[5] * b.y + wv[6] * b.z + wv[7] * b.w;
    }
  }
  store_row_sums<NT>(acc, n_tokens, rows, row, lane, y);
}

// tf32 mma m16n8k8, accumulating into d. Fragments (PTX ISA): lane (g, t) holds A's rows g and g + 8
// at k = t (a0, a1) and k = t + 4 (a2, a3), B's column g at k = t and t + 4, and C as the int8 mma's.
__device__ __forceinline__ void mma_tf32_m16n8k8(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                 uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  (void)d, (void)a0, (void)a1, (void)a2, (void)a3, (void)b0, (void)b1;
#endif
}
__device__ __forceinline__ uint32_t to_tf32(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
#else
  return __float_as_uint(x);
#endif
}

// bf16 weights times 2-16 tokens of f32 activations (batched decode steps; prompts without cuBLAS) on
// the tensor cores: tf32 mma m16n8k8. A bf16 weight is exactly a tf32 (its 16 low bits zero); each
// activation is split into two tf32, hi = tf32(x) and lo = tf32(x - hi), and multiplied twice, so the
// products keep ~22 of f32's 24 bits (activations rounded to bf16, as cuBLAS's path does, would keep
// 8). bf16_matmul_vec_kernel<8> reloaded every token's activations for each weight (16 bytes of them
// per weight byte at 8 tokens) and was bound by those loads: nf4's bf16 output matrix took 1.16 ms of an
// 8-sequence step (8B shape, H200). Here each weight and activation load serves a 16 x 8 tile.
// A block takes 16 rows; its 8 warps split the row's 32-column chunks (warp w: w, w + 8, ...) and add
// their partial sums in warp order (store_mma_partials). Lane t takes columns 8t..8t+7 of a chunk (one
// 16-byte load per row): mma j gets its columns 8t + 2j (k = t) and 8t + 2j + 1 (k = t + 4).
template <int NTILE>
__global__ void __launch_bounds__(256) bf16_mma_kernel(const uint8_t* w, size_t row_bytes, int64_t rows, int64_t cols,
                                                       const float* x, int64_t n_tokens, float* y) {
  constexpr int kTokens = 8 * NTILE;
  __shared__ float partial[8][kMmaRows * kTokens];
  const int warp = static_cast<int>(threadIdx.x / 32), lane = static_cast<int>(threadIdx.x % 32);
  const int g = lane / 4, t = lane % 4;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kMmaRows;  // rows: a multiple of 16 (the launch checks)
  const uint8_t* wg = w + (row0 + g) * row_bytes + 16 * t;  // rows g and g + 8 of the tile, lane t's columns
  const uint8_t* wg8 = wg + 8 * row_bytes;
  bool has_col[NTILE];
  const float* xr[NTILE];  // B's column g of tile n: token 8n + g (zeros past n_tokens)
#pragma unroll
  for (int n = 0; n < NTILE; ++n) {
    const int col = 8 * n + g;
    has_col[n] = col < n_tokens;
    xr[n] = x + static_cast<int64_t>(has_col[n] ? col : 0) * cols + 8 * t;
  }
  float acc[NTILE][4] = {};
  const int chunks = static_cast<int>(cols / 32);
  int c = warp;
  uint4 next_a = make_uint4(0u, 0u, 0u, 0u), next_b = next_a;
  if (c < chunks) {
    next_a = *reinterpret_cast<const uint4*>(wg + 64 * static_cast<int64_t>(c));
    next_b = *reinterpret_cast<const uint4*>(wg8 + 64 * static_cast<int64_t>(c));
  }
  for (; c < chunks; c += 8) {
    // This chunk's weights were loaded last iteration; the next chunk's go out now.
    const uint32_t ua[4] = {next_a.x, next_a.y, next_a.z, next_a.w}, ub[4] = {next_b.x, next_b.y, next_b.z, next_b.w};
    if (c + 8 < chunks) {
      next_a = *reinterpret_cast<const uint4*>(wg + 64 * static_cast<int64_t>(c + 8));
      next_b = *reinterpret_cast<const uint4*>(wg8 + 64 * static_cast<int64_t>(c + 8));
    }
#pragma unroll
    for (int n = 0; n < NTILE; ++n) {
      float4 x0 = make_float4(0.0f, 0.0f, 0.0f, 0.0f), x1 = x0;
      if (has_col[n]) {
        const float4* xv = reinterpret_cast<const float4*>(xr[n] + 32 * static_cast<int64_t>(c));
        x0 = xv[0];
        x1 = xv[1];
      }
      const float xs[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t a0 = ua[j] << 16, a2 = ua[j] & 0xFFFF0000u;  // row g: columns 8t + 2j, 8t + 2j + 1
        const uint32_t a1 = ub[j] << 16, a3 = ub[j] & 0xFFFF0000u;  // row g + 8
        const uint32_t hi0 = to_tf32(xs[2 * j]), hi1 = to_tf32(xs[2 * j + 1]);
        const uint32_t lo0 = to_tf32(xs[2 * j] - __uint_as_float(hi0)), lo1 = to_tf32(xs[2 * j + 1] - __uint_as_float(hi1));
        mma_tf32_m16n8k8(acc[n], a0, a1, a2, a3, hi0, hi1);
        mma_tf32_m16n8k8(acc[n], a0, a1, a2, a3, lo0, lo1);
      }
    }
  }
  store_mma_partials<NTILE>(acc, partial, warp, g, t, n_tokens, y, rows, row0);
}

template <int T, int NT>
__global__ void plain_matmul_kernel(const uint8_t* w, size_t row_bytes, int64_t rows, int64_t cols, const float* x,
                                    int64_t n_tokens, float* y) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const uint8_t* wr = w + row * row_bytes;
  float acc[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t] = 0.0f;
  for (int64_t i = lane; i < cols; i += 32) {
    const float wv = plain_at<T>(wr, i);
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      if (t >= n_tokens) break;
      acc[t] += wv * x[t * cols + i];
    }
  }
  store_row_sums<NT>(acc, n_tokens, rows, row, lane, y);
}

// Prompt matmuls on tensor cores: a chunk of rows dequantized to bf16 (weight = scale * level +
// min_term, the same values the integer kernels multiply), then a cuBLAS bf16 GEMM. A thread per
// 32-block; threads of a row's blocks are adjacent, so the 64-byte stores coalesce.
template <int T>
__global__ void dequant_bf16_kernel(const uint8_t* w, size_t row_bytes, int64_t rows, int64_t cols, bool dq,
                                    __nv_bfloat16* out) {
  __shared__ int16_t book[16];
  if constexpr (T == static_cast<int>(QuantType::NF4) || T == static_cast<int>(QuantType::FP4)) {
    if (threadIdx.x < 16) book[threadIdx.x] = (T == static_cast<int>(QuantType::NF4) ? c_nf4_q14 : c_fp4_q14)[threadIdx.x];
    __syncthreads();
  }
  const int64_t nblk = cols / 32, total = rows * nblk;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x % 32;
  // A warp's 32 blocks are 2 KB of consecutive output (the tile is [rows][cols], cols = 32 * nblk):
  // staged through shared memory and written as whole 512-byte runs per instruction (a lane's own
  // 64 bytes in 4 stores would write every 32-byte sector of L2 in two halves).
  __shared__ uint4 stage[8][32 * 4];  // 256 threads
  uint4* warp_stage = stage[threadIdx.x / 32];
  if (i < total) {
    const int64_t r = i / nblk, b = i % nblk;
    Block32 blk;
    decode32<T>(w + r * row_bytes, cols, b, dq, book, blk);
    uint32_t packed[16];
#pragma unroll
    for (int k = 0; k < 16; ++k) {
      const float s0 = 2 * k < 16 ? blk.scale_lo : blk.scale_hi;
      const __nv_bfloat162 pair = __floats2bfloat162_rn(s0 * static_cast<float>(blk.lv[2 * k]) + blk.min_term,
                                                        s0 * static_cast<float>(blk.lv[2 * k + 1]) + blk.min_term);
      memcpy(&packed[k], &pair, 4);
    }
#pragma unroll
    for (int k = 0; k < 4; ++k)
      warp_stage[4 * lane + k] = make_uint4(packed[4 * k], packed[4 * k + 1], packed[4 * k + 2], packed[4 * k + 3]);
  }
  __syncwarp();
  const int64_t warp_first = i - lane;  // the warp's first block; its output starts at out + 32 * warp_first
  uint4* dst = reinterpret_cast<uint4*>(out + 32 * warp_first);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int c = 32 * k + lane;  // 16-byte chunk of the warp's output: block c / 4, part c % 4
    if (warp_first + c / 4 < total) dst[c] = warp_stage[c];
  }
}

// A block's 32 weights as bf16, exactly as dequant_bf16_kernel writes them (so both prompt paths
// multiply the same weights).
__device__ __forceinline__ void block32_to_bf16(const Block32& blk, __nv_bfloat162* out) {
#pragma unroll
  for (int k = 0; k < 16; ++k) {
    const float s0 = 2 * k < 16 ? blk.scale_lo : blk.scale_hi;
    out[k] = __floats2bfloat162_rn(s0 * static_cast<float>(blk.lv[2 * k]) + blk.min_term,
                                   s0 * static_cast<float>(blk.lv[2 * k + 1]) + blk.min_term);
  }
}

// Prompt matmul on tensor cores without cuBLAS and without a dequantized copy of the weights (when a
// memory limit leaves no room for cuBLAS's handle and tiles, or libcublas is absent): a block takes 64
// rows of w and 128 tokens; per 64 columns, its threads dequantize the rows' blocks into shared memory
// (bf16, as dequant_bf16_kernel) and copy the tokens' bf16 activations, and each of the 4 warps
// multiplies its 16 rows by the 128 tokens with WMMA (f32 accumulation).
// y[t * y_ld + r] for the rows r of w and tokens t < n. Grid: (ceil(rows / 64), ceil(n / 128)), 128 threads.
template <int T>
__global__ void __launch_bounds__(128) dequant_mma_kernel(const uint8_t* w, size_t row_bytes, int64_t rows, int64_t cols,
                                                          bool dq, const __nv_bfloat16* x, int64_t n, float* y,
                                                          int64_t y_ld) {
  using namespace nvcuda;
  constexpr int kM = 64, kN = 128, kK = 64, kPad = kK + 8, kFrags = kN / 16;  // padded rows: 144 bytes, WMMA-aligned
  __shared__ __align__(32) __nv_bfloat16 ws[kM * kPad];
  __shared__ __align__(32) __nv_bfloat16 xs[kN * kPad];
  __shared__ __align__(32) float stage[4][16 * 16];
  __shared__ int16_t book[16];
  if constexpr (T == static_cast<int>(QuantType::NF4) || T == static_cast<int>(QuantType::FP4)) {
    if (threadIdx.x < 16) book[threadIdx.x] = (T == static_cast<int>(QuantType::NF4) ? c_nf4_q14 : c_fp4_q14)[threadIdx.x];
    __syncthreads();
  }
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kM, t0 = static_cast<int64_t>(blockIdx.y) * kN;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kFrags];
#pragma unroll
  for (int j = 0; j < kFrags; ++j) wmma::fill_fragment(acc[j], 0.0f);
  // Per 64 columns each thread dequantizes one 32-block (row threadIdx / 2, half threadIdx % 2) and
  // copies 8 of the 1024 16-byte pieces of the 128 tokens' activations.
  const int my_row = threadIdx.x / 2, my_half = threadIdx.x % 2;
  for (int64_t k0 = 0; k0 < cols; k0 += kK) {
    {
      const int64_t r = r0 + my_row, b = k0 / 32 + my_half;
      auto* dst = reinterpret_cast<__nv_bfloat162*>(ws + my_row * kPad + 32 * my_half);
      if (r < rows && 32 * b < cols) {
        Block32 blk;
        decode32<T>(w + r * row_bytes, cols, b, dq, book, blk);
        block32_to_bf16(blk, dst);
      } else {
#pragma unroll
        for (int k = 0; k < 16; ++k) dst[k] = __floats2bfloat162_rn(0.0f, 0.0f);
      }
    }
#pragma unroll
    for (int k = 0; k < kN / 16; ++k) {
      const int piece = static_cast<int>(threadIdx.x) + 128 * k;  // token piece / 8, columns 8 * (piece % 8)
      const int tt = piece / 8, c8 = piece % 8;
      const bool in = t0 + tt < n && k0 + 8 * c8 < cols;
      *reinterpret_cast<uint4*>(xs + tt * kPad + 8 * c8) =
          in ? *reinterpret_cast<const uint4*>(x + (t0 + tt) * cols + k0 + 8 * c8) : make_uint4(0, 0, 0, 0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
      wmma::load_matrix_sync(a, ws + warp * 16 * kPad + kk, kPad);
#pragma unroll
      for (int j = 0; j < kFrags; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> b;
        wmma::load_matrix_sync(b, xs + j * 16 * kPad + kk, kPad);
        wmma::mma_sync(acc[j], a, b, acc[j]);
      }
    }
    __syncthreads();
  }
  // acc[j]: rows r0 + 16 * warp + m, tokens t0 + 16 * j + c; y is column-major in those terms (ld y_ld).
  const int64_t rr = r0 + 16 * warp;
#pragma unroll
  for (int j = 0; j < kFrags; ++j) {
    const int64_t tt = t0 + 16 * j;
    if (rr + 16 <= rows && tt + 16 <= n && y_ld % 4 == 0) {
      wmma::store_matrix_sync(y + tt * y_ld + rr, acc[j], static_cast<unsigned>(y_ld), wmma::mem_col_major);
    } else {
      wmma::store_matrix_sync(stage[warp], acc[j], 16, wmma::mem_col_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int m = e % 16, c = e / 16;
        if (rr + m < rows && tt + c < n) y[(tt + c) * y_ld + rr + m] = stage[warp][e];
      }
      __syncwarp();
    }
  }
}

__global__ void to_bf16_kernel(const float* x, int64_t n, __nv_bfloat16* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = __float2bfloat16_rn(x[i]);
}

}  // namespace
}  // namespace bioquant
