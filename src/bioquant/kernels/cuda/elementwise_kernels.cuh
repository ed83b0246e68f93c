// Elementwise kernels: block reductions, RMSNorm (with the residual add and activation quantization),
// gated activations, biases, softcaps.
// Part of the CUDA backend's single translation unit: included by gpu_decoder.cu (directly or through
// the files it includes) and nowhere else, so its definitions share that file's anonymous namespace.
#pragma once

#include <climits>
#include <cmath>
#include <cstdint>

#include "bioquant/kernels/cuda/device_common.cuh"
#include "bioquant/kernels/cuda/gpu_memory_plan.h"
#include "bioquant/kernels/cuda/qmatvec_kernels.cuh"

namespace bioquant {
namespace {

// Reductions over the block (kGroup = 0) or over each group of kGroup threads (threadIdx.x / kGroup,
// kGroup a multiple of 32), every thread of the block calling: butterflies within the warps, then the
// group's warps in warp order. red: one float per warp of the block.
template <int kGroup = 0>
__device__ __forceinline__ float block_sum(float v, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int nwarps = kGroup > 0 ? kGroup / 32 : (blockDim.x + 31) / 32, first = kGroup > 0 ? warp / nwarps * nwarps : 0;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  // The warps' sums in warp order, their shared-memory reads issued together (a loop bounded by
  // nwarps waited for each read before its add).
  float part[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) part[i] = i < nwarps ? red[first + i] : 0.0f;
  float total = 0.0f;
#pragma unroll
  for (int i = 0; i < 32; ++i)
    if (i < nwarps) total += part[i];
  return total;
}
template <int kGroup = 0>
__device__ __forceinline__ float block_max(float v, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int nwarps = kGroup > 0 ? kGroup / 32 : (blockDim.x + 31) / 32, first = kGroup > 0 ? warp / nwarps * nwarps : 0;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float m = -INFINITY;
  for (int i = 0; i < nwarps; ++i) m = fmaxf(m, red[first + i]);
  return m;
}

// An attention score: the scaled dot product, softcapped (tanh(s / c) * c) when softcap > 0 (gemma2).
__device__ __forceinline__ float attention_score(float dot, float scale, float softcap) {
  const float s = dot * scale;
  return softcap > 0.0f ? tanhf(s / softcap) * softcap : s;
}

// scores[0, len) (shared memory; the block's or, with kGroup, the thread's group's) -> exp(score - m),
// in place, m the largest score (into *max_out); returns their sum.
template <int kGroup = 0>
__device__ __forceinline__ float block_exp_in_place(float* scores, int64_t len, float* red, float* max_out) {
  const int tid = kGroup > 0 ? threadIdx.x % kGroup : threadIdx.x, stride = kGroup > 0 ? kGroup : blockDim.x;
  float m = -INFINITY;
  for (int64_t s = tid; s < len; s += stride) m = fmaxf(m, scores[s]);
  m = block_max<kGroup>(m, red);
  *max_out = m;
  float sum = 0.0f;
  for (int64_t s = tid; s < len; s += stride) {
    const float e = expf(scores[s] - m);
    scores[s] = e;
    sum += e;
  }
  return block_sum<kGroup>(sum, red);
}
// The same; returns 1 / the sum (the softmax's normaliser).
__device__ __forceinline__ float block_softmax_in_place(float* scores, int64_t len, float* red) {
  float m;
  return 1.0f / block_exp_in_place(scores, len, red, &m);
}

// out[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * w   (one block per row; in place allowed). The row
// is read once into registers with all its loads in flight: a decode step normalises a single row,
// and a loop of dependent passes over it cost more than a matmul of the small matrices.
constexpr int kNormCached = 8;  // row values per thread held in registers by the norm kernels
// This thread's share of the sum of squares of row x (+ add, when given): its first kNormCached values
// (columns threadIdx.x + k * blockDim.x) loaded together into v, then any rest one by one; the
// same order of adds either way.
// value(i): the row's value at column i.
template <class Value>
__device__ __forceinline__ float thread_sum_squares_of(Value value, int64_t n, float* v) {
#pragma unroll
  for (int k = 0; k < kNormCached; ++k) {
    const int64_t i = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    v[k] = i < n ? value(i) : 0.0f;
  }
  float ss = 0.0f;
#pragma unroll
  for (int k = 0; k < kNormCached; ++k) ss += v[k] * v[k];  // columns past n add +0
  for (int64_t i = threadIdx.x + static_cast<int64_t>(kNormCached) * blockDim.x; i < n; i += blockDim.x) {
    const float u = value(i);
    ss += u * u;
  }
  return ss;
}
__device__ __forceinline__ float thread_sum_squares(const float* x, const float* add, int64_t n, float* v) {
  return thread_sum_squares_of([&](int64_t i) { return add != nullptr ? x[i] + add[i] : x[i]; }, n, v);
}

// One row xr -> o by the block (in place allowed).
__device__ __forceinline__ void rms_norm_row(const float* xr, const float* w, float eps, int64_t n, float* o) {
  __shared__ float red[32];
  float v[kNormCached];
  const float total = block_sum(thread_sum_squares(xr, nullptr, n, v), red);
  const float scale = 1.0f / sqrtf(total / static_cast<float>(n) + eps);
#pragma unroll
  for (int k = 0; k < kNormCached; ++k) {
    const int64_t i = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    if (i < n) o[i] = v[k] * scale * w[i];
  }
  for (int64_t i = threadIdx.x + static_cast<int64_t>(kNormCached) * blockDim.x; i < n; i += blockDim.x) o[i] = xr[i] * scale * w[i];
}
__global__ void rms_norm_kernel(const float* x, const float* w, float eps, int64_t n, float* out) {
  rms_norm_row(x + blockIdx.x * n, w, eps, n, out + blockIdx.x * n);
}

// Qwen3's norm of every head of q and of k, in place, in one (dependent) launch: blocks [0, q_rows) take
// q's head rows, the others k's; the sums and products of rms_norm_kernel with as many threads.
__global__ void qk_norm_kernel(float* q, float* k, const float* wq, const float* wk, float eps, int64_t head_dim,
                               int64_t q_rows) {
  await_then_allow();
  const int64_t r = blockIdx.x;
  float* row = r < q_rows ? q + r * head_dim : k + (r - q_rows) * head_dim;
  rms_norm_row(row, r < q_rows ? wq : wk, eps, head_dim, row);
}

constexpr int64_t kSlicedNormRows = kGpuSlicedNormRows;

// Fusion of the residual add, RMSNorm and the activation quantization of the matmuls that follow:
// x_out = x + add (when add is given; with add_w, x + norm(add) * add_w: Gemma 2's norm after each block,
// the same sum and products as rms_norm_kernel's, so the same bits); out = norm(x_out) * w (also in bf16 into
// out_bf16 when given, for tensor-core matmuls); (q, d, s) = out quantized per 32 (when q is given, for the
// integer kernels).
// Grid (tokens, column slices); 1024 threads per block; n a multiple of 32 (lanes of a warp hold 32
// consecutive columns, so a block's absmax is a warp reduction), slice a multiple of 32. Every block
// sums the squares of its whole row (in the same order whatever the slices, so results do not
// depend on them) and writes its slice: one token's norm then runs on n / slice SMs instead of as a
// chain of dependent steps on one. Blocks read x and add while others write, so with several
// slices x_out and out must alias neither (with one, x_out may be x).
__global__ void add_norm_quant_kernel(const float* x, const float* add, const float* add_w, float* x_out, const float* w,
                                      float eps, int64_t n, int64_t slice, float* out, __nv_bfloat16* out_bf16, int8_t* q,
                                      float* d, int* s) {
  // This thread's first weight, loaded before the wait (no kernel writes the weights): after the
  // row's sum it would be a round trip to memory of its own.
  const int64_t i_first = blockIdx.y * slice + threadIdx.x;
  const float w_first = i_first < n ? w[i_first] : 0.0f;
  await_then_allow();
  __shared__ float red[32];
  const int64_t t = blockIdx.x;
  const float* xr = x + t * n;
  const float* ar = add != nullptr ? add + t * n : nullptr;
  // The row's values loaded together (one round trip to L2, not one per element a thread sums).
  float cached[kNormCached];
  float add_scale = 1.0f;  // add_w: the added row's own norm
  if (add_w != nullptr) {
    add_scale = 1.0f / sqrtf(block_sum(thread_sum_squares(ar, nullptr, n, cached), red) / static_cast<float>(n) + eps);
  }
  // Products rounded as rms_norm_kernel's stored ones are (no fused multiply-add into the sum below).
  const auto added = [&](int64_t i) { return add_w != nullptr ? __fmul_rn(__fmul_rn(ar[i], add_scale), add_w[i]) : ar[i]; };
  const float total =
      block_sum(thread_sum_squares_of([&](int64_t i) { return ar != nullptr ? xr[i] + added(i) : xr[i]; }, n, cached), red);
  const float scale = 1.0f / sqrtf(total / static_cast<float>(n) + eps);
  const int lane = threadIdx.x % 32;
  const int64_t end = min(n, (blockIdx.y + 1) * slice);
  for (int64_t i = blockIdx.y * slice + threadIdx.x; i - lane < end; i += blockDim.x) {  // warp-uniform bound
    float v = xr[i];
    if (ar != nullptr) {
      v += added(i);
      x_out[t * n + i] = v;
    }
    const float o = v * scale * (i == i_first ? w_first : w[i]);
    out[t * n + i] = o;
    if (out_bf16 != nullptr) out_bf16[t * n + i] = __float2bfloat16_rn(o);
    if (q != nullptr) quantize_lane(o, lane, t, i / 32, n / 32, q, d, s);
  }
}

// The MLP's gated activation: act(x) * b, gelu-tanh or SiLU.
__device__ __forceinline__ float gated_activation(float x, float b, bool gelu) {
  return gelu ? 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x))) * b : x / (1.0f + expf(-x)) * b;
}

// a = act(a) * b, then a quantized per 32 for the down projection (n_tokens rows of ff columns,
// ff a multiple of 32; a thread per column).
__global__ void act_mul_quant_kernel(float* a, const float* b, int64_t n_tokens, int64_t ff, bool gelu, int8_t* q, float* d,
                                     int* s) {
  await_then_allow();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i - threadIdx.x % 32 >= n_tokens * ff) return;  // warp-uniform
  const float v = gated_activation(a[i], b[i], gelu);
  a[i] = v;
  const int64_t t = i / ff;
  quantize_lane(v, threadIdx.x % 32, t, (i - t * ff) / 32, ff / 32, q, d, s);
}

__global__ void add_bias_kernel(float* y, const float* bias, int64_t rows, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < rows * n) y[i] += bias[i % n];
}

__global__ void add_kernel(float* x, const float* h, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) x[i] += h[i];
}

// a = act(a) * b; also in bf16 into a_bf16 when given (the input of a tensor-core matmul).
__global__ void act_mul_kernel(float* a, const float* b, int64_t n, bool gelu, __nv_bfloat16* a_bf16) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float v = gated_activation(a[i], b[i], gelu);
  a[i] = v;
  if (a_bf16 != nullptr) a_bf16[i] = __float2bfloat16_rn(v);
}

__global__ void softcap_kernel(float* x, int64_t n, float cap) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) x[i] = tanhf(x[i] / cap) * cap;
}

// top_token (model/decoder.h) of each logit row: a block per row (1024 threads), the largest value
// and, among equal ones, the lowest id. Each thread scans its ids in increasing order keeping the
// first of its maxima; then the pairs are reduced across the block.
constexpr int kTopThreads = 1024;
__device__ __forceinline__ bool top_before(float v, int i, float w, int j) { return v > w || (v == w && i < j); }
__global__ void __launch_bounds__(kTopThreads) top_token_kernel(const float* logits, int64_t vocab, int* top) {
  const float* row = logits + static_cast<int64_t>(blockIdx.x) * vocab;
  float best = -INFINITY;
  int id = INT_MAX;
  for (int64_t i = threadIdx.x; i < vocab; i += kTopThreads) {
    const float v = row[i];
    if (id == INT_MAX || v > best) best = v, id = static_cast<int>(i);
  }
#pragma unroll
  for (int o = 16; o > 0; o /= 2) {
    const float w = __shfl_xor_sync(0xffffffffu, best, o);
    const int j = __shfl_xor_sync(0xffffffffu, id, o);
    if (top_before(w, j, best, id)) best = w, id = j;
  }
  __shared__ float warp_best[kTopThreads / 32];
  __shared__ int warp_id[kTopThreads / 32];
  if (threadIdx.x % 32 == 0) warp_best[threadIdx.x / 32] = best, warp_id[threadIdx.x / 32] = id;
  __syncthreads();
  if (threadIdx.x != 0) return;
  for (int w = 1; w < kTopThreads / 32; ++w)
    if (top_before(warp_best[w], warp_id[w], best, id)) best = warp_best[w], id = warp_id[w];
  top[blockIdx.x] = id;
}

}  // namespace
}  // namespace bioquant
