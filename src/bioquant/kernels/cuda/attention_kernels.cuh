// Attention: RoPE and the KV-cache store, the fused decode attention (GQA, splits, bf16/q8 caches),
// and the prompt kernels.
// Part of the CUDA backend's single translation unit: included by gpu_decoder.cu (directly or through
// the files it includes) and nowhere else, so its definitions share that file's anonymous namespace.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstddef>
#include <cstdint>

#include "bioquant/kernels/cuda/device_common.cuh"
#include "bioquant/kernels/cuda/elementwise_kernels.cuh"
#include "bioquant/kernels/cuda/qmatvec_kernels.cuh"

namespace bioquant {
namespace {

// RoPE (rotate-half over the first rotary_dim of each head) for q and k of every token, then K and V
// stored into the cache at their positions. Grid: tokens; threads over (head, i). inv_freq holds
// rotary_dim / 2 frequencies, then longrope's long ones, which a launch whose last token is at or past
// long_from takes; cos and sin are scaled by rope_scale (longrope's attention factor, else 1).
template <class KV>
__device__ __forceinline__ KV to_kv(float v);
template <>
__device__ __forceinline__ float to_kv<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 to_kv<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
__device__ __forceinline__ float from_kv(float v) { return v; }
__device__ __forceinline__ float from_kv(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class KV>
__global__ void rope_store_kernel(float* q, float* k, const float* v, const float* inv_freq, const int64_t* pos0_ptr, int n_heads,
                                  int n_kv_heads, int head_dim, int rotary_dim, int64_t long_from, float rope_scale,
                                  KV* k_cache, KV* v_cache, __half* k_scale, __half* v_scale, __nv_bfloat16* q_heads,
                                  int64_t n_tokens) {
  const int64_t t = blockIdx.x;
  const int64_t pos = *pos0_ptr + t;
  const int half = rotary_dim / 2;
  if (*pos0_ptr + n_tokens - 1 >= long_from) inv_freq += half;  // longrope's long factors (rope_frequencies)
  const int q_dim = n_heads * head_dim, kv_dim = n_kv_heads * head_dim;
  for (int j = threadIdx.x; j < (n_heads + n_kv_heads) * half; j += blockDim.x) {
    const int h = j / half, i = j % half;
    float* head = h < n_heads ? q + t * q_dim + h * head_dim : k + t * kv_dim + (h - n_heads) * head_dim;
    const float angle = static_cast<float>(pos) * inv_freq[i];
    float s, c;
    sincosf(angle, &s, &c);
    s *= rope_scale;
    c *= rope_scale;
    const float x1 = head[i], x2 = head[i + half];
    head[i] = x1 * c - x2 * s;
    head[i + half] = x2 * c + x1 * s;
  }
  __syncthreads();
  if (q_heads != nullptr) {  // the rotated q in bf16, head-major [head][token][dim], for the tensor-core attention
    for (int j = threadIdx.x; j < q_dim; j += blockDim.x)
      q_heads[((j / head_dim) * n_tokens + t) * head_dim + j % head_dim] = __float2bfloat16_rn(q[t * q_dim + j]);
  }
  if constexpr (std::is_same_v<KV, int8_t>) {
    // q8: a warp per 32 values, d = absmax / 127 stored in fp16 (kv_dim is a multiple of 32).
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32, nb = kv_dim / 32;
    for (int b = warp; b < 2 * nb; b += nwarps) {
      const bool is_v = b >= nb;
      const int64_t j = 32 * (is_v ? b - nb : b) + lane;
      const float x = is_v ? v[t * kv_dim + j] : k[t * kv_dim + j];
      float amax = fabsf(x);
#pragma unroll
      for (int o = 16; o > 0; o /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
      const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
      (is_v ? v_cache : k_cache)[pos * kv_dim + j] = static_cast<int8_t>(__float2int_rn(x * id));
      if (lane == 0) (is_v ? v_scale : k_scale)[(pos * kv_dim + j) / 32] = __float2half_rn(d);
    }
  } else {
    for (int j = threadIdx.x; j < kv_dim; j += blockDim.x) {
      k_cache[pos * kv_dim + j] = to_kv<KV>(k[t * kv_dim + j]);
      v_cache[pos * kv_dim + j] = to_kv<KV>(v[t * kv_dim + j]);
    }
  }
}

// Element i of a cache (q8: times its block's scale).
template <class KV>
__device__ __forceinline__ float load_kv(const KV* cache, const __half* scale, int64_t i) {
  if constexpr (std::is_same_v<KV, int8_t>) {
    return static_cast<float>(cache[i]) * __half2float(scale[i / 32]);
  } else {
    return from_kv(cache[i]);
  }
}

// Attention of token t (at position pos0 + t) and head h over its cache. Grid (heads, tokens); scores
// in dynamic shared memory.
template <class KV>
__global__ void attention_kernel(const float* q, const KV* k_cache, const KV* v_cache, const __half* k_scale,
                                 const __half* v_scale, const int64_t* pos0_ptr, int n_heads, int n_kv_heads, int head_dim,
                                 int64_t window, float scale, float softcap, float* out) {
  extern __shared__ float scores[];
  __shared__ float red[32];
  const int h = blockIdx.x;
  const int64_t t = blockIdx.y, pos = *pos0_ptr + t;
  const int g = h / (n_heads / n_kv_heads);
  const int q_dim = n_heads * head_dim, kv_dim = n_kv_heads * head_dim;
  const int64_t first = window > 0 ? max(static_cast<int64_t>(0), pos - window + 1) : 0;
  const int64_t len = pos - first + 1;
  const float* qh = q + t * q_dim + h * head_dim;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
  for (int64_t s = warp; s < len; s += nwarps) {
    const int64_t kr = (first + s) * kv_dim + g * head_dim;
    float acc = 0.0f;
    for (int i = lane; i < head_dim; i += 32) acc += qh[i] * load_kv(k_cache, k_scale, kr + i);
#pragma unroll
    for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) scores[s] = attention_score(acc, scale, softcap);
  }
  __syncthreads();
  const float inv = block_softmax_in_place(scores, len, red);
  float* o = out + t * q_dim + h * head_dim;
  for (int i = threadIdx.x; i < head_dim; i += blockDim.x) {
    float acc = 0.0f;
    for (int64_t s = 0; s < len; ++s) acc += scores[s] * load_kv(v_cache, v_scale, (first + s) * kv_dim + g * head_dim + i);
    o[i] = acc * inv;
  }
}

// Eight consecutive cache elements from element i (a multiple of 8), as floats.
__device__ __forceinline__ void load8_kv(const float* cache, const __half*, int64_t i, float* o) {
  const float4 a = *reinterpret_cast<const float4*>(cache + i), b = *reinterpret_cast<const float4*>(cache + i + 4);
  o[0] = a.x, o[1] = a.y, o[2] = a.z, o[3] = a.w, o[4] = b.x, o[5] = b.y, o[6] = b.z, o[7] = b.w;
}
__device__ __forceinline__ void load8_kv(const __nv_bfloat16* cache, const __half*, int64_t i, float* o) {
  const uint4 u = *reinterpret_cast<const uint4*>(cache + i);
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    o[2 * k] = __uint_as_float(w[k] << 16);
    o[2 * k + 1] = __uint_as_float(w[k] & 0xFFFF0000u);
  }
}
__device__ __forceinline__ void load8_kv(const int8_t* cache, const __half* scale, int64_t i, float* o) {
  const uint2 u = *reinterpret_cast<const uint2*>(cache + i);
  const float d = __half2float(scale[i / 32]);
  const uint32_t w[2] = {u.x, u.y};
#pragma unroll
  for (int k = 0; k < 8; ++k) o[k] = static_cast<float>(static_cast<int8_t>(w[k / 4] >> (8 * (k % 4)))) * d;
}

// Elements i and i + 1 of a cache (i even), as floats (q8: times their block's scale), as load_kv.
__device__ __forceinline__ void load2_kv(const float* cache, const __half*, int64_t i, float& a, float& b) {
  const float2 u = *reinterpret_cast<const float2*>(cache + i);
  a = u.x;
  b = u.y;
}
__device__ __forceinline__ void load2_kv(const __nv_bfloat16* cache, const __half*, int64_t i, float& a, float& b) {
  const uint32_t w = *reinterpret_cast<const uint32_t*>(cache + i);
  a = __uint_as_float(w << 16);
  b = __uint_as_float(w & 0xFFFF0000u);
}
__device__ __forceinline__ void load2_kv(const int8_t* cache, const __half* scale, int64_t i, float& a, float& b) {
  const uint32_t w = *reinterpret_cast<const uint16_t*>(cache + i);
  const float d = __half2float(scale[i / 32]);
  a = static_cast<float>(static_cast<int8_t>(w & 0xFFu)) * d;
  b = static_cast<float>(static_cast<int8_t>(w >> 8)) * d;
}

// The decode attention's staged cache rows: stage_len positions of K and of V for one KV head, then
// (q8) their fp16 scales. Bytes of shared memory, a multiple of 16. Rows are padded to an odd multiple
// of 64 bytes: the scores' 16-byte reads of two adjacent positions (8 lanes, one phase) then fall on
// the two halves of the banks instead of overlapping.
__host__ __device__ constexpr int decode_stage_row(int head_dim, int kv_bytes) {
  const int bytes = head_dim * kv_bytes;  // a multiple of 32
  return bytes + (64 - bytes % 128 + 128) % 128;
}
__host__ __device__ constexpr size_t decode_stage_bytes(int head_dim, int kv_bytes, int stage_len) {
  return 2 * static_cast<size_t>(stage_len) * decode_stage_row(head_dim, kv_bytes) +
         (kv_bytes == 1 ? (2 * static_cast<size_t>(stage_len) * (head_dim / 32) * 2 + 15) / 16 * 16 : 0);
}

// Decode attention's threads per query head (its reductions: block_max / block_sum over a block of
// this many threads, the same order of adds whatever the heads per block).
constexpr int kDecodeHeadThreads = 128, kDecodeMaxHeads = 4;

// A KV cache on the GPU: K and V laid out [layer][position][kv_dim] (capacity positions a layer);
// also what a batched decode attention launch reads per sequence (blockIdx.z: the sequence).
struct DevKv {
  void* k = nullptr;
  void* v = nullptr;
  __half* k_scale = nullptr;  // q8 only
  __half* v_scale = nullptr;
  size_t values_bytes = 0, scale_bytes = 0;  // of each of K and V
  int64_t capacity = 0;
};

// Decode attention (one new token of a sequence), fused: RoPE of the token's q heads and of their k
// head (as rope_store_kernel), the new k and v stored into the cache by the KV group's first q head,
// attention over the cache (the new position from shared memory, rounded as stored), and, when aq is
// given, the output quantized per 32 for the output projection's integer kernels. Three launches
// (RoPE + store, attention, quantization) cost more than their work on small contexts.
// A block serves up to kDecodeMaxHeads query heads of one KV group (blockDim.x / kDecodeHeadThreads;
// grid.x = KV heads * the blocks a group takes), kDecodeHeadThreads threads each: the group's cached
// K and V rows are read from memory once for all of them. head_dim a multiple of 32, at most 256.
// Shared memory: q, k, v of each head, the staged cache rows (decode_stage_bytes), then each head's
// scores (score_ld apart). Scores: four lanes per position; values: a thread per pair of dimensions of
// two heads. Every sum in the order the one-head-per-block kernel used: identical results.
// Long contexts are split over the grid's y blocks (flash-decoding): with one block per head, 32
// blocks of a 132-SM card each walked the whole context (8B q4_k on an H100, 4096 positions in the
// cache: 129 tok/s; split 16 ways, 300).
// Each split takes at least min_chunk positions (a short context: one block, the unsplit arithmetic)
// and leaves its partial softmax (max, sum, unnormalised output) in `part`; the head's last block to
// finish (counted in `done`, which it resets) adds them up in split order, so results do not depend
// on which block finishes when.
template <class KV, int kChunks>
__global__ void __launch_bounds__(kDecodeHeadThreads * kDecodeMaxHeads)
    attention_decode_kernel(const float* q, const float* k, const float* v, const float* inv_freq,
                            const int64_t* pos0_ptr, int n_heads, int n_kv_heads, int head_dim, int rotary_dim,
                            int64_t long_from, float rope_scale,
                            KV* k_cache, KV* v_cache, __half* k_scale, __half* v_scale, int64_t window, float scale,
                            float softcap, float* out, int8_t* aq, float* ad, int* as, int min_chunk, float* part,
                            int* done, int stage_len, int score_ld, const DevKv* refs, int layer) {
  if (refs != nullptr) {  // batched decode: sequence blockIdx.z, its row, position, cache and buffers
    const int64_t z = blockIdx.z, qd = static_cast<int64_t>(n_heads) * head_dim, kvd = static_cast<int64_t>(n_kv_heads) * head_dim;
    const DevKv r = refs[z];
    const int64_t layer_elems = r.capacity * kvd;
    k_cache = static_cast<KV*>(r.k) + layer * layer_elems;
    v_cache = static_cast<KV*>(r.v) + layer * layer_elems;
    k_scale = r.k_scale != nullptr ? r.k_scale + layer * layer_elems / 32 : nullptr;
    v_scale = r.v_scale != nullptr ? r.v_scale + layer * layer_elems / 32 : nullptr;
    q += z * qd;
    k += z * kvd;
    v += z * kvd;
    pos0_ptr += z;
    out += z * qd;
    if (aq != nullptr) {
      aq += z * qd;
      ad += z * qd / 32;
      as += z * qd / 32;
    }
    part += z * n_heads * gridDim.y * (head_dim + 2);
    done += z * n_heads;
  }
  extern __shared__ float decode_smem[];
  __shared__ float red[32];
  __shared__ bool last_block[kDecodeMaxHeads];
  __shared__ float head_sums[kDecodeMaxHeads];
  const int heads_here = blockDim.x / kDecodeHeadThreads, sub = threadIdx.x / kDecodeHeadThreads;
  const int tid = threadIdx.x % kDecodeHeadThreads;
  const int group = n_heads / n_kv_heads, parts = (group + heads_here - 1) / heads_here;
  const int g = blockIdx.x / parts, local = blockIdx.x % parts * heads_here + sub;
  // A block's last heads may lie past its group: their threads stage and synchronise, write nothing.
  const bool active = local < group;
  const int h = g * group + min(local, group - 1);
  const int64_t pos = *pos0_ptr;  // uploaded before the step's first kernel: readable before the wait
  const int64_t first = window > 0 ? max(static_cast<int64_t>(0), pos - window + 1) : 0;
  const int64_t len = pos - first + 1;
  const int splits = static_cast<int>(min(static_cast<int64_t>(gridDim.y), (len + min_chunk - 1) / min_chunk));
  const int split = static_cast<int>(blockIdx.y);
  if (split >= splits) return;
  const int64_t chunk = (len + splits - 1) / splits;
  const int64_t s_begin = min(len, split * chunk), count = min(len, s_begin + chunk) - s_begin;
  const bool has_new = s_begin + count == len && count > 0;  // this split holds the new position
  const int64_t cached = has_new ? count - 1 : count;        // positions read from the cache
  const int q_dim = n_heads * head_dim, kv_dim = n_kv_heads * head_dim, half = rotary_dim / 2;
  float* qs = decode_smem + 3 * head_dim * sub;
  float* kn = qs + head_dim;
  float* vn = kn + head_dim;
  // The split's first stage_len cached rows of K and V (all of them when they fit) go to shared
  // memory in one round of 16-byte asynchronous copies, started before the wait: they were written by
  // earlier steps, and the scores and values then read them from there instead of waiting on the
  // cache load by load. Same values, same order of adds.
  constexpr int kvb = static_cast<int>(sizeof(KV));
  const int stage_ld = decode_stage_row(head_dim, kvb) / kvb;  // elements per staged row
  const int staged = static_cast<int>(min(cached, static_cast<int64_t>(stage_len)));
  KV* k_stage = reinterpret_cast<KV*>(decode_smem + 3 * head_dim * heads_here);
  KV* v_stage = k_stage + static_cast<int64_t>(stage_len) * stage_ld;
  __half* ks_stage = reinterpret_cast<__half*>(v_stage + static_cast<int64_t>(stage_len) * stage_ld);
  __half* vs_stage = ks_stage + stage_len * (head_dim / 32);
  float* const scores_base =
      reinterpret_cast<float*>(reinterpret_cast<char*>(k_stage) + decode_stage_bytes(head_dim, kvb, stage_len));
  float* scores = scores_base + static_cast<int64_t>(score_ld) * sub;
  // Two groups of copies: the keys (needed first, by the scores), then the values.
  for (int which = 0; which < 2; ++which) {
    const KV* src = (which == 0 ? k_cache : v_cache) + (first + s_begin) * kv_dim + g * head_dim;
    KV* dst = which == 0 ? k_stage : v_stage;
    // Chunk c = threadIdx.x + k * blockDim.x of the staged rows: row sp, 16-byte chunk e, stepped
    // without a division per copy.
    const int row_chunks = head_dim * kvb / 16, step_rows = blockDim.x / row_chunks, step_chunks = blockDim.x % row_chunks;
    int sp = threadIdx.x / row_chunks, e = threadIdx.x % row_chunks;
    for (int c = threadIdx.x; c < staged * row_chunks; c += blockDim.x) {
      cp_async16(dst + sp * stage_ld + e * (16 / kvb), src + static_cast<int64_t>(sp) * kv_dim + e * (16 / kvb));
      sp += step_rows;
      e += step_chunks;
      if (e >= row_chunks) {
        e -= row_chunks;
        ++sp;
      }
    }
    if constexpr (std::is_same_v<KV, int8_t>) {  // scales two at a time (head_dim, kv_dim multiples of 64)
      const __half* src_scale = which == 0 ? k_scale : v_scale;
      __half* dst_scale = which == 0 ? ks_stage : vs_stage;
      const int pairs = head_dim / 64;
      for (int c = threadIdx.x; c < staged * pairs; c += blockDim.x) {
        const int sp = c / pairs, e = 2 * (c % pairs);
        cp_async4(dst_scale + sp * (head_dim / 32) + e, src_scale + ((first + s_begin + sp) * kv_dim + g * head_dim) / 32 + e);
      }
    }
    cp_async_commit();
  }
  await_then_allow();
  const int lane = threadIdx.x % 32;
  const bool writer = local == 0 && split == 0;
  for (int i = tid; i - lane < head_dim; i += kDecodeHeadThreads) {  // warp-uniform bound (head_dim % 32 == 0)
    const float* qh = q + h * head_dim;
    const float* kh = k + g * head_dim;
    float qv = qh[i], kv = kh[i];
    if (i < 2 * half) {
      const int j = i < half ? i : i - half;
      float sn, cs;
      sincosf(static_cast<float>(pos) * inv_freq[pos >= long_from ? j + half : j], &sn, &cs);
      sn *= rope_scale;
      cs *= rope_scale;
      const float q1 = qh[j], q2 = qh[j + half], k1 = kh[j], k2 = kh[j + half];
      qv = i < half ? q1 * cs - q2 * sn : q2 * cs + q1 * sn;
      kv = i < half ? k1 * cs - k2 * sn : k2 * cs + k1 * sn;
    }
    float vv = v[g * head_dim + i];
    const int64_t at = pos * kv_dim + g * head_dim + i;
    if constexpr (std::is_same_v<KV, int8_t>) {
      // As rope_store_kernel: a warp's 32 values share one fp16 scale; kept as the cache will give them back.
      float ka = fabsf(kv), va = fabsf(vv);
#pragma unroll
      for (int o = 16; o > 0; o /= 2) {
        ka = fmaxf(ka, __shfl_xor_sync(0xffffffffu, ka, o));
        va = fmaxf(va, __shfl_xor_sync(0xffffffffu, va, o));
      }
      const float kd = ka / 127.0f, vd = va / 127.0f;
      const int kq = __float2int_rn(kv * (kd != 0.0f ? 1.0f / kd : 0.0f));
      const int vq = __float2int_rn(vv * (vd != 0.0f ? 1.0f / vd : 0.0f));
      const __half kdh = __float2half_rn(kd), vdh = __float2half_rn(vd);
      if (writer) {
        k_cache[at] = static_cast<int8_t>(kq);
        v_cache[at] = static_cast<int8_t>(vq);
        if (lane == 0) {
          k_scale[at / 32] = kdh;
          v_scale[at / 32] = vdh;
        }
      }
      kv = static_cast<float>(kq) * __half2float(kdh);
      vv = static_cast<float>(vq) * __half2float(vdh);
    } else {
      const KV kc = to_kv<KV>(kv), vc = to_kv<KV>(vv);
      if (writer) {
        k_cache[at] = kc;
        v_cache[at] = vc;
      }
      kv = from_kv(kc);
      vv = from_kv(vc);
    }
    qs[i] = qv;
    kn[i] = kv;
    vn[i] = vv;
  }
  cp_async_wait_group<1>();  // the keys
  __syncthreads();
  // Scores: four adjacent lanes per position, each over every fourth 8-element chunk of the head
  // (the four read adjacent 16-byte chunks), then added across the four: a thread per position
  // summed a chain of head_dim dependent adds, the kernel's longest. head_dim % 32 == 0, so the
  // chunks split evenly, at most 8 per lane (head_dim <= 256), all loaded before the adds.
  const int quarter = tid & 3, chunks = head_dim / 8;
  float qr[kChunks][8];  // this lane's chunks of q (kChunks >= head_dim / 32)
#pragma unroll
  for (int j = 0; j < kChunks; ++j)
#pragma unroll
    for (int e = 0; e < 8; ++e) qr[j][e] = quarter + 4 * j < chunks ? qs[8 * (quarter + 4 * j) + e] : 0.0f;
  const int64_t my_count = active ? count : 0;  // positions this head scores
  for (int64_t base = 0; base < my_count; base += kDecodeHeadThreads / 4) {  // warp-uniform: every lane shuffles
    const int64_t sidx = base + tid / 4;
    const int64_t p = first + s_begin + sidx;
    float acc = 0.0f;
    if (sidx < count && p == pos) {
      for (int c = quarter; c < chunks; c += 4)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc += qs[8 * c + e] * kn[8 * c + e];
    } else if (sidx < count) {
      const int64_t at = p * kv_dim + g * head_dim;
      const bool in_stage = sidx < staged;
      const KV* row = in_stage ? k_stage + sidx * stage_ld : k_cache + at;
      const __half* row_scale = !std::is_same_v<KV, int8_t> ? nullptr : in_stage ? ks_stage + sidx * (head_dim / 32) : k_scale + at / 32;
      // 256-wide heads: the key's chunks two at a time. q's 8 chunks and all 8 of the key's filled the
      // 128 registers a thread may have here and spilled: a 208-byte stack frame, which the driver
      // reserves for every resident thread (38 MB on an H200). Same adds in the same order: same bits.
      constexpr int kRound = kChunks > 4 ? 2 : kChunks;
#pragma unroll
      for (int j0 = 0; j0 < kChunks; j0 += kRound) {
        float kv8[kRound][8];
#pragma unroll
        for (int j = 0; j < kRound; ++j)
          if (quarter + 4 * (j0 + j) < chunks) load8_kv(row, row_scale, 8 * (quarter + 4 * (j0 + j)), kv8[j]);
#pragma unroll
        for (int j = 0; j < kRound; ++j) {
          if (quarter + 4 * (j0 + j) < chunks) {
#pragma unroll
            for (int e = 0; e < 8; ++e) acc += qr[j0 + j][e] * kv8[j][e];
          }
        }
      }
    }
    acc += __shfl_xor_sync(0xffffffffu, acc, 1);
    acc += __shfl_xor_sync(0xffffffffu, acc, 2);
    if (quarter == 0 && sidx < count) scores[sidx] = attention_score(acc, scale, softcap);
  }
  __syncthreads();
  float m = 0.0f;
  // Each head's reductions over its 128 threads, as a 128-thread block reduced them.
  const float sum = block_exp_in_place<kDecodeHeadThreads>(scores, my_count, red, &m);
  if (tid == 0) head_sums[sub] = sum;
  cp_async_wait_group<0>();  // the values
  __syncthreads();
  // Values: a thread per pair of dimensions of two heads (one when the block has an odd number), all
  // the block's heads reading the same staged rows, their scores four positions at a time; each
  // output's sum over positions in position order (as a thread per dimension summed it).
  const int pairs = head_dim / 2, per_thread = heads_here % 2 == 0 ? 2 : 1, head_sets = heads_here / per_thread;
  for (int t = threadIdx.x; t - lane < head_sets * pairs; t += blockDim.x) {  // warp-uniform bound
    const int va = min(t / pairs, head_sets - 1) * per_thread, vb = va + per_thread - 1, i = 2 * (t % pairs);
    const int la = blockIdx.x % parts * heads_here + va, lb = la + per_thread - 1;
    // Lanes 16k..16k+15 hold 32 dimensions of each of their heads (head_dim % 32 == 0): quantize_pair's groups.
    const bool in_range = t < head_sets * pairs;
    const bool valid_a = in_range && la < group, valid_b = in_range && per_thread == 2 && lb < group;
    const int ha = g * group + min(la, group - 1), hb = g * group + min(lb, group - 1);
    const float* sa = scores_base + static_cast<int64_t>(score_ld) * va;
    const float* sb = scores_base + static_cast<int64_t>(score_ld) * vb;
    float a0 = 0.0f, a1 = 0.0f, b0 = 0.0f, b1 = 0.0f;
    const auto add = [&](float pa, float pb, float x0, float x1) {
      a0 += pa * x0;
      a1 += pa * x1;
      b0 += pb * x0;
      b1 += pb * x1;
    };
    if (valid_a) {
      int64_t sidx = 0;
      for (; sidx + 4 <= staged; sidx += 4) {  // score_ld % 4 == 0: aligned
        const float4 pa = *reinterpret_cast<const float4*>(sa + sidx), pb = *reinterpret_cast<const float4*>(sb + sidx);
        float x[4][2];
#pragma unroll
        for (int u = 0; u < 4; ++u)
          load2_kv(v_stage + (sidx + u) * stage_ld, vs_stage + (sidx + u) * (head_dim / 32), i, x[u][0], x[u][1]);
        add(pa.x, pb.x, x[0][0], x[0][1]);
        add(pa.y, pb.y, x[1][0], x[1][1]);
        add(pa.z, pb.z, x[2][0], x[2][1]);
        add(pa.w, pb.w, x[3][0], x[3][1]);
      }
      for (; sidx < staged; ++sidx) {
        float x0, x1;
        load2_kv(v_stage + sidx * stage_ld, vs_stage + sidx * (head_dim / 32), i, x0, x1);
        add(sa[sidx], sb[sidx], x0, x1);
      }
      // Cached rows past the staged ones: kVBatch loads in flight at a time (the sums keep their order).
      const int64_t vi = (first + s_begin) * kv_dim + g * head_dim + i;
      constexpr int kVBatch = 16;
      for (; sidx + kVBatch <= cached; sidx += kVBatch) {
        float x[kVBatch][2];
#pragma unroll
        for (int u = 0; u < kVBatch; ++u) load2_kv(v_cache, v_scale, vi + (sidx + u) * kv_dim, x[u][0], x[u][1]);
#pragma unroll
        for (int u = 0; u < kVBatch; ++u) add(sa[sidx + u], sb[sidx + u], x[u][0], x[u][1]);
      }
      for (; sidx < cached; ++sidx) {
        float x0, x1;
        load2_kv(v_cache, v_scale, vi + sidx * kv_dim, x0, x1);
        add(sa[sidx], sb[sidx], x0, x1);
      }
      if (has_new) add(sa[count - 1], sb[count - 1], vn[i], vn[i + 1]);  // every head's vn holds the new v
    }
    if (splits == 1) {
      const float inv_a = 1.0f / head_sums[va], inv_b = 1.0f / head_sums[vb];
      const float oa0 = a0 * inv_a, oa1 = a1 * inv_a, ob0 = b0 * inv_b, ob1 = b1 * inv_b;
      if (valid_a) *reinterpret_cast<float2*>(out + ha * head_dim + i) = make_float2(oa0, oa1);
      if (valid_b) *reinterpret_cast<float2*>(out + hb * head_dim + i) = make_float2(ob0, ob1);
      if (aq != nullptr) {
        quantize_pair(oa0, oa1, lane, (ha * head_dim + i) / 32, valid_a, aq, ad, as);
        if (per_thread == 2) quantize_pair(ob0, ob1, lane, (hb * head_dim + i) / 32, valid_b, aq, ad, as);
      }
    } else {
      const int64_t split_at = static_cast<int64_t>(split) * (head_dim + 2) + i;
      if (valid_a) {
        float* pa = part + static_cast<int64_t>(ha) * gridDim.y * (head_dim + 2) + split_at;
        pa[0] = a0;
        pa[1] = a1;
      }
      if (valid_b) {
        float* pb = part + static_cast<int64_t>(hb) * gridDim.y * (head_dim + 2) + split_at;
        pb[0] = b0;
        pb[1] = b1;
      }
    }
  }
  float* part_head = part + static_cast<int64_t>(h) * gridDim.y * (head_dim + 2);
  if (splits == 1) return;
  if (tid == 0 && active) {
    part_head[split * (head_dim + 2) + head_dim] = m;
    part_head[split * (head_dim + 2) + head_dim + 1] = sum;
  }
  // The last of the head's blocks combines: the fence makes this block's partials visible before
  // its count, and the last block's reads of the others' after it.
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    const bool last = active && atomicAdd(&done[h], 1) == splits - 1;
    if (last) done[h] = 0;  // ready for the next launch
    last_block[sub] = last;
  }
  __syncthreads();
  if (!last_block[sub]) return;
  __threadfence();
  float m_all = -INFINITY;
  for (int y = 0; y < splits; ++y) m_all = fmaxf(m_all, __ldcg(part_head + y * (head_dim + 2) + head_dim));
  float total = 0.0f;
  for (int y = 0; y < splits; ++y)
    total += __ldcg(part_head + y * (head_dim + 2) + head_dim + 1) *
             expf(__ldcg(part_head + y * (head_dim + 2) + head_dim) - m_all);
  for (int i = tid; i - lane < head_dim; i += kDecodeHeadThreads) {
    float acc = 0.0f;
    for (int y = 0; y < splits; ++y)
      acc += __ldcg(part_head + y * (head_dim + 2) + i) * expf(__ldcg(part_head + y * (head_dim + 2) + head_dim) - m_all);
    const float o = acc * (1.0f / total);
    out[h * head_dim + i] = o;
    if (aq != nullptr) quantize_lane(o, lane, 0, (h * head_dim + i) / 32, q_dim / 32, aq, ad, as);
  }
}

// Floats between two heads' scores in one block, for splits of up to `positions`.
constexpr int64_t decode_score_ld(int64_t positions) { return (positions + 3) / 4 * 4; }
// Its shared memory per head less the staged rows: q, k, v and `positions` scores.
constexpr size_t decode_attention_smem(int head_dim, int64_t positions) {
  return static_cast<size_t>(3 * head_dim + decode_score_ld(positions)) * sizeof(float);
}
// attention_kernel's scores (one block per head and token, the whole context): padded, the compiler may
// read them three at a time past the last one used.
inline size_t attention_smem_bytes(int64_t positions) { return static_cast<size_t>((positions + 7) / 4 * 4) * sizeof(float); }
constexpr size_t kAttentionSmemBytes = 200 * 1024;  // attention_kernel's opt-in shared memory (at most)

// Prompt attention (n > 1 tokens): a block per (head, tile of kQTile queries). Keys and values pass
// through shared memory kKTile positions at a time, shared by the tile's queries (attention_kernel
// re-reads the cache for every query: ~20 ms of a 512-token prompt of the 8B shape). Online softmax
// in f32. A warp owns 4 queries and works on them together, so each key or value read from shared
// memory (as float4) serves 4 queries: for the scores a lane takes one key of the tile, for the
// output a lane takes 4 consecutive head dimensions (and 4 more 128 further on, up to 256).
constexpr int kQTile = 16, kKTile = 32, kMaxHeadDim = 256, kWarpQueries = 4;
constexpr size_t kThreadStackBytes = 64;  // see GpuDecoder::GpuDecoder

// Prompt attention on tensor cores (bf16 KV cache): scores S = Q K^T and output O = P V by cuBLAS,
// batched over KV heads with each head's group of query heads as one matrix (Q and O head-major);
// between them this kernel turns a row of scores into probabilities: scale, softcap, causal and
// sliding-window mask, softmax, bf16. Row r = (query head, token r % n); ld: the rows' stride.
__global__ void attention_softmax_kernel(const float* scores, int64_t ld, int64_t n, int64_t len, const int64_t* pos0_ptr,
                                         int64_t window, float scale, float softcap, __nv_bfloat16* probs) {
  __shared__ float red[32];
  const int64_t r = blockIdx.x, qpos = *pos0_ptr + r % n;
  const int64_t first = window > 0 ? max(static_cast<int64_t>(0), qpos - window + 1) : 0;
  const float* row = scores + r * ld;
  const auto score = [&](int64_t p) { return attention_score(row[p], scale, softcap); };
  float m = -INFINITY;
  for (int64_t p = first + threadIdx.x; p <= qpos; p += blockDim.x) m = fmaxf(m, score(p));
  m = block_max(m, red);
  float sum = 0.0f;
  for (int64_t p = first + threadIdx.x; p <= qpos; p += blockDim.x) sum += expf(score(p) - m);
  sum = block_sum(sum, red);
  const float inv = 1.0f / sum;
  for (int64_t p = threadIdx.x; p < len; p += blockDim.x)
    probs[r * ld + p] = __float2bfloat16_rn(p >= first && p <= qpos ? expf(score(p) - m) * inv : 0.0f);
}

// o [head][token][dim] (head-major) -> out [token][head * dim + dim].
// (and in bf16 into out_bf16 when given).
__global__ void heads_to_tokens_kernel(const float* o, int64_t n, int n_heads, int head_dim, float* out,
                                       __nv_bfloat16* out_bf16) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t q_dim = static_cast<int64_t>(n_heads) * head_dim;
  if (i >= n * q_dim) return;
  const int64_t t = i / q_dim, h = (i % q_dim) / head_dim, d = i % head_dim;
  out[i] = o[(h * n + t) * head_dim + d];
  if (out_bf16 != nullptr) out_bf16[i] = __float2bfloat16_rn(out[i]);
}

inline int prefill_attention_pad(int head_dim) { return head_dim + 4; }  // float4 rows, no bank conflicts
inline size_t prefill_attention_smem(int head_dim) {
  return static_cast<size_t>((kQTile + 2 * kKTile) * prefill_attention_pad(head_dim)) * sizeof(float);
}

template <class KV>
__global__ void attention_prefill_kernel(const float* q, const KV* k_cache, const KV* v_cache, const __half* k_scale,
                                         const __half* v_scale, const int64_t* pos0_ptr, int64_t n_tokens, int n_heads,
                                         int n_kv_heads, int head_dim, int64_t window, float scale, float softcap,
                                         float* out) {
  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  constexpr int kGroups = kMaxHeadDim / 128;  // float4 groups a lane owns in the output
  const int pad = head_dim + 4, pad4 = pad / 4, hd4 = head_dim / 4;
  float* qs = smem;               // [kQTile][pad]
  float* ks = qs + kQTile * pad;  // [kKTile][pad]
  float* vs = ks + kKTile * pad;  // [kKTile][pad]
  const int h = blockIdx.x;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * kQTile, pos0 = *pos0_ptr;
  const int g = h / (n_heads / n_kv_heads);
  const int q_dim = n_heads * head_dim, kv_dim = n_kv_heads * head_dim;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t nq = min(static_cast<int64_t>(kQTile), n_tokens - t0);
  for (int i = threadIdx.x; i < kQTile * head_dim; i += blockDim.x) {
    const int r = i / head_dim, c = i - r * head_dim;
    qs[r * pad + c] = r < nq ? q[(t0 + r) * q_dim + h * head_dim + c] : 0.0f;
  }
  const int r0 = warp * kWarpQueries;  // this warp's first query in the tile
  const int64_t last = pos0 + t0 + nq - 1;
  const int64_t first = window > 0 ? max(static_cast<int64_t>(0), pos0 + t0 - window + 1) : 0;
  float m[kWarpQueries], l[kWarpQueries];
  float4 acc[kWarpQueries][kGroups];
#pragma unroll
  for (int i = 0; i < kWarpQueries; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.0f;
#pragma unroll
    for (int gi = 0; gi < kGroups; ++gi) acc[i][gi] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
  for (int64_t k0 = first; k0 <= last; k0 += kKTile) {
    __syncthreads();  // the previous tile is consumed (and the queries are loaded)
    // Staged through registers kStage at a time, so a thread's loads are in flight together
    // (a load-then-store loop waits out one cache latency per element).
    constexpr int kStage = 8;
    bool loaded = false;
    if constexpr (std::is_same_v<KV, __nv_bfloat16>) {
      if (head_dim % 8 == 0) {  // 16-byte loads of 8 values
        const int per_row = head_dim / 8, chunks = kKTile * per_row;
        for (int base = 0; base < chunks; base += 4 * blockDim.x) {
          uint4 kk[4], vv[4];
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const int i = base + u * blockDim.x + threadIdx.x;
            const int r = i / per_row, c8 = i - r * per_row;
            kk[u] = vv[u] = make_uint4(0, 0, 0, 0);
            if (i < chunks && k0 + r <= last) {
              const int64_t idx = (k0 + r) * kv_dim + g * head_dim + 8 * c8;
              kk[u] = *reinterpret_cast<const uint4*>(k_cache + idx);
              vv[u] = *reinterpret_cast<const uint4*>(v_cache + idx);
            }
          }
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const int i = base + u * blockDim.x + threadIdx.x;
            if (i >= chunks) break;
            const int r = i / per_row, c8 = i - r * per_row;
            const uint32_t kw[4] = {kk[u].x, kk[u].y, kk[u].z, kk[u].w}, vw[4] = {vv[u].x, vv[u].y, vv[u].z, vv[u].w};
            float4* kd = reinterpret_cast<float4*>(ks + r * pad + 8 * c8);
            float4* vd = reinterpret_cast<float4*>(vs + r * pad + 8 * c8);
            kd[0] = make_float4(__uint_as_float(kw[0] << 16), __uint_as_float(kw[0] & 0xFFFF0000u),
                                __uint_as_float(kw[1] << 16), __uint_as_float(kw[1] & 0xFFFF0000u));
            kd[1] = make_float4(__uint_as_float(kw[2] << 16), __uint_as_float(kw[2] & 0xFFFF0000u),
                                __uint_as_float(kw[3] << 16), __uint_as_float(kw[3] & 0xFFFF0000u));
            vd[0] = make_float4(__uint_as_float(vw[0] << 16), __uint_as_float(vw[0] & 0xFFFF0000u),
                                __uint_as_float(vw[1] << 16), __uint_as_float(vw[1] & 0xFFFF0000u));
            vd[1] = make_float4(__uint_as_float(vw[2] << 16), __uint_as_float(vw[2] & 0xFFFF0000u),
                                __uint_as_float(vw[3] << 16), __uint_as_float(vw[3] & 0xFFFF0000u));
          }
        }
        loaded = true;
      }
    }
    for (int base = 0; !loaded && base < kKTile * head_dim; base += kStage * blockDim.x) {
      float kk[kStage], vv[kStage];
#pragma unroll
      for (int u = 0; u < kStage; ++u) {
        const int i = base + u * blockDim.x + threadIdx.x;
        const int r = i / head_dim, c = i - r * head_dim;
        const int64_t p = k0 + r;
        kk[u] = vv[u] = 0.0f;
        if (i < kKTile * head_dim && p <= last) {
          const int64_t idx = p * kv_dim + g * head_dim + c;
          kk[u] = load_kv(k_cache, k_scale, idx);
          vv[u] = load_kv(v_cache, v_scale, idx);
        }
      }
#pragma unroll
      for (int u = 0; u < kStage; ++u) {
        const int i = base + u * blockDim.x + threadIdx.x;
        if (i < kKTile * head_dim) {
          const int r = i / head_dim, c = i - r * head_dim;
          ks[r * pad + c] = kk[u];
          vs[r * pad + c] = vv[u];
        }
      }
    }
    __syncthreads();
    if (r0 >= nq) continue;  // warp-uniform: this warp has no queries (but keeps the barriers)
    // Scores: lane = key k0 + lane, against the warp's 4 queries.
    const int64_t kp = k0 + lane;
    float sc[kWarpQueries];
    {
      float dot[kWarpQueries] = {0.0f, 0.0f, 0.0f, 0.0f};
      const float4* kr = reinterpret_cast<const float4*>(ks) + lane * pad4;
      const float4* qr = reinterpret_cast<const float4*>(qs) + r0 * pad4;
      for (int c4 = 0; c4 < hd4; ++c4) {
        const float4 kv = kr[c4];
#pragma unroll
        for (int i = 0; i < kWarpQueries; ++i) {
          const float4 qv = qr[i * pad4 + c4];
          dot[i] += qv.x * kv.x + qv.y * kv.y + qv.z * kv.z + qv.w * kv.w;
        }
      }
#pragma unroll
      for (int i = 0; i < kWarpQueries; ++i) {
        const int64_t qpos = pos0 + t0 + r0 + i;
        const bool visible = r0 + i < nq && kp <= qpos && (window <= 0 || kp > qpos - window);
        sc[i] = visible ? attention_score(dot[i], scale, softcap) : -INFINITY;
      }
    }
    float p[kWarpQueries];
#pragma unroll
    for (int i = 0; i < kWarpQueries; ++i) {
      float tile_max = sc[i];
#pragma unroll
      for (int o = 16; o > 0; o /= 2) tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, o));
      const float m_new = fmaxf(m[i], tile_max);
      // m_new = -inf: nothing visible yet for this query; keep its state as is.
      const float corr = m_new == -INFINITY ? 1.0f : expf(m[i] - m_new);
      p[i] = sc[i] == -INFINITY ? 0.0f : expf(sc[i] - m_new);
      float psum = p[i];
#pragma unroll
      for (int o = 16; o > 0; o /= 2) psum += __shfl_xor_sync(0xffffffffu, psum, o);
      l[i] = l[i] * corr + psum;
      m[i] = m_new;
#pragma unroll
      for (int gi = 0; gi < kGroups; ++gi) {
        acc[i][gi].x *= corr;
        acc[i][gi].y *= corr;
        acc[i][gi].z *= corr;
        acc[i][gi].w *= corr;
      }
    }
    // Output: lane owns float4 groups lane, lane + 32 of the head dimensions.
    const int64_t keys = min(static_cast<int64_t>(kKTile), last - k0 + 1);
    for (int j = 0; j < keys; ++j) {
      float pj[kWarpQueries];
#pragma unroll
      for (int i = 0; i < kWarpQueries; ++i) pj[i] = __shfl_sync(0xffffffffu, p[i], j);
#pragma unroll
      for (int gi = 0; gi < kGroups; ++gi) {
        const int c4 = lane + 32 * gi;
        if (c4 >= hd4) break;
        const float4 vv = reinterpret_cast<const float4*>(vs)[j * pad4 + c4];
#pragma unroll
        for (int i = 0; i < kWarpQueries; ++i) {
          acc[i][gi].x += pj[i] * vv.x;
          acc[i][gi].y += pj[i] * vv.y;
          acc[i][gi].z += pj[i] * vv.z;
          acc[i][gi].w += pj[i] * vv.w;
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kWarpQueries; ++i) {
    if (r0 + i >= nq) break;
    const float inv = 1.0f / l[i];
#pragma unroll
    for (int gi = 0; gi < kGroups; ++gi) {
      const int c4 = lane + 32 * gi;
      if (c4 >= hd4) break;
      const float4 a = acc[i][gi];
      reinterpret_cast<float4*>(out + (t0 + r0 + i) * q_dim + h * head_dim)[c4] =
          make_float4(a.x * inv, a.y * inv, a.z * inv, a.w * inv);
    }
  }
}

}  // namespace
}  // namespace bioquant
