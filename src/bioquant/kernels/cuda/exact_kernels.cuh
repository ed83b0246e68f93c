// Exact numerics (kernels/exact.h): the CPU engine's exact steps (kernels/cpu/exact_ops.cpp), the
// same floats bit for bit. Speed is secondary: byte loads, one warp per output, no graphs.
// Part of the CUDA backend's single translation unit: included by gpu_decoder.cu (directly or through
// the files it includes) and nowhere else, so its definitions share that file's anonymous namespace.
#pragma once

#include <cstdint>

#include "bioquant/kernels/cuda/block_decoders.cuh"
#include "bioquant/kernels/cuda/device_common.cuh"
#include "bioquant/kernels/exact.h"

namespace bioquant {
namespace {

// Adds each lane's partial in lane order (exact::canonical_sum's second half); every lane gets it.
template <class T>
__device__ T exact_lane_order_sum(T partial) {
  T s = T(0);
  for (int l = 0; l < 32; ++l) s = exact::add(s, __shfl_sync(0xffffffffu, partial, l));
  return s;
}

// A warp per row (blockDim.x = 32 * rows per block): out = x * scale * w; in place allowed.
__global__ void exact_rms_norm_kernel(const float* x, const float* w, float eps, int64_t rows, int64_t n, float* out) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (r >= rows) return;
  const int lane = static_cast<int>(threadIdx.x % 32);
  const float* xr = x + r * n;
  double p = 0.0;
  for (int64_t i = lane; i < n; i += 32) {
    const double v = static_cast<double>(xr[i]);
    p = exact::add(p, exact::mul(v, v));
  }
  const float scale = exact::rms_scale(exact_lane_order_sum(p), n, eps);
  for (int64_t i = lane; i < n; i += 32) out[r * n + i] = exact::mul(exact::mul(xr[i], scale), w[i]);
}

// A thread per (token, 32-column block): activation quants and scales (exact::quantize_block).
__global__ void exact_quantize_kernel(const float* x, int64_t n_tokens, int64_t cols, int64_t nblk, int8_t* q, float* d) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n_tokens * nblk) return;
  const int64_t t = i / nblk, b = i % nblk;
  d[i] = exact::quantize_block(x + t * cols + 32 * b, cols - 32 * b < 32 ? cols - 32 * b : 32, q + 32 * i);
}

// A warp per (row, up to kExactTokens tokens) of a quantized matrix: lane l takes blocks l, l + 32, ...,
// each decoded once for the warp's tokens (each token's sum in its own canonical order).
constexpr int kExactTokens = 8;
template <int NT>  // tokens per warp at most: 1 (decode) or kExactTokens
__global__ void exact_qmatvec_kernel(QuantType type, const uint8_t* w, size_t row_bytes, int64_t rows, int64_t cols, bool dq,
                                     const int8_t* q, const float* d, int64_t n_tokens, float* y) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * NT;
  if (r >= rows) return;
  const int nt = static_cast<int>(n_tokens - t0 < NT ? n_tokens - t0 : NT);
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int64_t nblk = (cols + 31) / 32;
  const uint8_t* row = w + static_cast<size_t>(r) * row_bytes;
  const int16_t* book = type == QuantType::NF4 ? c_nf4_q14 : c_fp4_q14;
  const bool bytes = type != QuantType::NF4 && type != QuantType::FP4;  // levels fit int8: dp4a; else 16-bit: dp2a
  float p[NT] = {};
  for (int64_t b = lane; b < nblk; b += 32) {
    exact::Levels lv;
    exact::decode_block(type, row, cols, b, dq, book, c_dynamic_map, lv);
    int packed[16];  // four byte levels per word (8 words), or two 16-bit levels per word (16 words)
    if (bytes) {
      for (int k = 0; k < 8; ++k)
        packed[k] = static_cast<int>((lv.lv[4 * k] & 0xFF) | ((lv.lv[4 * k + 1] & 0xFF) << 8) |
                                     ((lv.lv[4 * k + 2] & 0xFF) << 16) | (static_cast<uint32_t>(lv.lv[4 * k + 3] & 0xFF) << 24));
    } else {
      for (int k = 0; k < 16; ++k)
        packed[k] = static_cast<int>((lv.lv[2 * k] & 0xFFFF) | (static_cast<uint32_t>(lv.lv[2 * k + 1] & 0xFFFF) << 16));
    }
#pragma unroll
    for (int t = 0; t < NT; ++t) {  // a fixed bound: p stays in registers
      if (t >= nt) break;
      const int64_t i = (t0 + t) * nblk + b;
      // The same exact integer sums as block_term's loops, two or four products per instruction.
      const int* qw = reinterpret_cast<const int*>(q + i * 32);  // 32-byte aligned blocks
      int lo = 0, hi = 0, sum_q = 0;
      for (int k = 0; k < 4; ++k) {
        const int a = qw[k], c = qw[4 + k];
        if (bytes) {
          lo = __dp4a(packed[k], a, lo);
          hi = __dp4a(packed[4 + k], c, hi);
        } else {
          lo = __dp2a_hi(packed[2 * k + 1], a, __dp2a_lo(packed[2 * k], a, lo));
          hi = __dp2a_hi(packed[8 + 2 * k + 1], c, __dp2a_lo(packed[8 + 2 * k], c, hi));
        }
        sum_q = __dp4a(0x01010101, c, __dp4a(0x01010101, a, sum_q));
      }
      p[t] = exact::add(p[t], exact::block_float(lv, lo, hi, sum_q, d[i]));
    }
  }
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    if (t >= nt) break;
    const float sum = exact_lane_order_sum(p[t]);
    if (lane == 0) y[(t0 + t) * rows + r] = exact::finish_row(type, row, sum);
  }
}

// A warp per (row, token) of a plain (f32/f16/bf16) matrix: lane l takes columns l, l + 32, ... (one
// token per warp: measured faster than several for these, whose rows need no decoding).
__global__ void exact_plain_matvec_kernel(QuantType type, const uint8_t* w, size_t row_bytes, int64_t rows, int64_t cols,
                                          const float* x, int64_t n_tokens, float* y) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int64_t t = blockIdx.y;
  if (r >= rows || t >= n_tokens) return;
  const int lane = static_cast<int>(threadIdx.x % 32);
  const uint8_t* row = w + static_cast<size_t>(r) * row_bytes;
  float p = 0.0f;
  for (int64_t i = lane; i < cols; i += 32) p = exact::add(p, exact::mul(exact::plain_value(type, row, i), x[t * cols + i]));
  const float sum = exact_lane_order_sum(p);
  if (lane == 0) y[t * rows + r] = sum;
}

// A block per token: RoPE of its q and k heads at position pos0 + token, then K and V into the f32 cache.
__global__ void exact_rope_store_kernel(float* q, float* k, const float* v, const float* inv_freq, float rope_scale,
                                        int64_t pos0, int n_heads, int n_kv_heads, int head_dim, int rotary_dim,
                                        float* k_cache, float* v_cache) {
  const int64_t t = blockIdx.x, pos = pos0 + t;
  const int half = rotary_dim / 2, kvd = n_kv_heads * head_dim;
  float* qt = q + t * n_heads * head_dim;
  float* kt = k + t * kvd;
  for (int j = threadIdx.x; j < (n_heads + n_kv_heads) * half; j += blockDim.x) {
    const int head = j / half, i = j % half;
    float* x = head < n_heads ? qt + head * head_dim : kt + (head - n_heads) * head_dim;
    float s, c;
    exact::sin_cos(exact::mul(exact::to_float(pos), inv_freq[i]), &s, &c);
    exact::rope_pair(x[i], x[i + half], exact::mul(c, rope_scale), exact::mul(s, rope_scale));
  }
  __syncthreads();
  for (int j = threadIdx.x; j < kvd; j += blockDim.x) {
    k_cache[pos * kvd + j] = kt[j];
    v_cache[pos * kvd + j] = v[t * kvd + j];
  }
}

// A block (4 warps) per (query head, token) of one sequence: exact::attention_head over the f32 cache.
// Shared memory: the scores of the positions attended to.
__global__ void exact_attention_kernel(const float* q, const float* k_cache, const float* v_cache, int64_t pos0, int n_heads,
                                       int n_kv_heads, int head_dim, int64_t window, float scale, float cap, float* out) {
  extern __shared__ float scores[];
  __shared__ float shared_max, shared_inv;
  const int h = blockIdx.x;
  const int64_t t = blockIdx.y, pos = pos0 + t;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int64_t kvd = static_cast<int64_t>(n_kv_heads) * head_dim, g = h / (n_heads / n_kv_heads);
  const int64_t first = window > 0 && pos - window + 1 > 0 ? pos - window + 1 : 0, len = pos - first + 1;
  const float* qh = q + (t * n_heads + h) * head_dim;
  const float* kb = k_cache + first * kvd + g * head_dim;
  const float* vb = v_cache + first * kvd + g * head_dim;
  for (int64_t s = warp; s < len; s += warps) {
    float p = 0.0f;
    for (int i = lane; i < head_dim; i += 32) p = exact::add(p, exact::mul(qh[i], kb[s * kvd + i]));
    float sc = exact::mul(exact_lane_order_sum(p), scale);
    if (cap > 0.0f) sc = exact::softcap(sc, cap);
    if (lane == 0) scores[s] = sc;
  }
  __syncthreads();
  if (warp == 0) {
    // The maximum (any order gives it) and then the sum of exponentials in canonical order.
    float m = scores[0];
    for (int64_t s = lane; s < len; s += 32) m = scores[s] > m ? scores[s] : m;
    for (int o = 16; o > 0; o /= 2) {
      const float other = __shfl_xor_sync(0xffffffffu, m, o);
      m = other > m ? other : m;
    }
    if (lane == 0) shared_max = m;
  }
  __syncthreads();
  for (int64_t s = threadIdx.x; s < len; s += blockDim.x) scores[s] = exact::exp_f(exact::sub(scores[s], shared_max));
  __syncthreads();
  if (warp == 0) {
    double p = 0.0;
    for (int64_t s = lane; s < len; s += 32) p = exact::add(p, static_cast<double>(scores[s]));
    const double total = exact_lane_order_sum(p);
    if (lane == 0) shared_inv = exact::to_float(exact::div(1.0, total));
  }
  __syncthreads();
  for (int64_t s = threadIdx.x; s < len; s += blockDim.x) scores[s] = exact::mul(scores[s], shared_inv);
  __syncthreads();
  for (int i = threadIdx.x; i < head_dim; i += blockDim.x) {
    float o = 0.0f;
    for (int64_t s = 0; s < len; ++s) o = exact::add(o, exact::mul(scores[s], vb[s * kvd + i]));
    out[(t * n_heads + h) * head_dim + i] = o;
  }
}

__global__ void exact_act_mul_kernel(float* a, const float* b, int64_t n, bool gelu) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) a[i] = gelu ? exact::gelu_tanh_mul(a[i], b[i]) : exact::silu_mul(a[i], b[i]);
}

__global__ void exact_softcap_kernel(float* x, int64_t n, float cap) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) x[i] = exact::softcap(x[i], cap);
}

}  // namespace
}  // namespace bioquant
