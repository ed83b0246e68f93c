// CUDA backend (see gpu_decoder.h). One translation unit: the per-format block decoders, the
// matmul kernels, the elementwise kernels, attention, and the forward pass that strings them.
#include "bioquant/kernels/cuda/gpu_decoder.h"
#include "bioquant/kernels/cuda/bnb4_permute_tables.h"
#include "bioquant/kernels/cuda/gpu_memory_plan.h"
#include "bioquant/kernels/cuda/knobs.h"

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dlfcn.h>
#include <initializer_list>
#include <map>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "bioquant/core/error.h"
#include "bioquant/kernels/cpu/ops.h"
#include "bioquant/kernels/exact.h"
#include "bioquant/model/decoder.h"
#include "bioquant/model/model.h"
#include "bioquant/quant/quant.h"
#include "bioquant/quant/random_rows.h"

namespace bioquant {
namespace {

void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw Error(std::string("CUDA: ") + what + ": " + cudaGetErrorString(e));
}
#define CUDA_OK(call) cuda_check((call), #call)

// ---------------------------------------------------------------------------------------------
// Block decoders. decode32 gives the 32 integer levels of activation block b (columns 32b..32b+31)
// of a row and the scales that turn sum(level * qx) into the dot product:
//   dot_b = dx_b * (scale_lo * isum(0..15) + scale_hi * isum(16..31) + min_term * sum(qx))
// exactly the quantities of qgemm_scalar.cpp (levels include the format's offset).

struct Block32 {
  int lv[32];
  uint32_t packed[8];  // the same levels, four signed bytes per word (for dp4a); not nf4/fp4 (16-bit levels)
  uint32_t pairs[16];  // nf4/fp4: the levels two per word, signed 16-bit (for dp2a)
  float scale_lo, scale_hi, min_term;
};

__device__ __forceinline__ float half_at(const uint8_t* p) {
  const uint16_t h = static_cast<uint16_t>(p[0] | (p[1] << 8));
  return __half2float(__ushort_as_half(h));
}
__device__ __forceinline__ float f32_at(const uint8_t* p) {
  uint32_t u = static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) | (static_cast<uint32_t>(p[2]) << 16) |
               (static_cast<uint32_t>(p[3]) << 24);
  return __uint_as_float(u);
}

__constant__ int16_t c_nf4_q14[16];
__constant__ int16_t c_fp4_q14[16];
// The same levels as byte-permute tables (a Bnb4PermuteTables as words: four 2-word tables, then the radix).
constexpr int kBnb4PermuteWords = sizeof(Bnb4PermuteTables) / sizeof(uint32_t);
static_assert(kBnb4PermuteWords == 9, "Bnb4PermuteTables: 8 table words and the radix");
__constant__ uint32_t c_nf4_permute[kBnb4PermuteWords];
__constant__ uint32_t c_fp4_permute[kBnb4PermuteWords];
__constant__ float c_dynamic_map[256];
__constant__ unsigned c_early_blocks;  // see allow_dependents_in_last_wave


template <int T>
__device__ __forceinline__ void decode32(const uint8_t* row, int64_t cols, int64_t b, bool dq, const int16_t* book, Block32& o);
// N * 4 bytes from p (global or shared memory), whatever its alignment (q8_0, q4_0 and q6_k blocks are
// 2-byte aligned), as little-endian words: aligned 4-byte loads (one more than N) joined by funnel
// shifts, instead of N * 4 byte loads. Reads up to 3 bytes past the end (callers stay inside their block).
constexpr size_t kMatrixTail = kGpuMatrixTail;  // see upload_matrix

template <int N>
__device__ __forceinline__ void load_words(const uint8_t* p, uint32_t* w) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const uint32_t* base = reinterpret_cast<const uint32_t*>(a & ~uintptr_t{3});
  const uint32_t shift = 8 * static_cast<uint32_t>(a & 3);
  uint32_t r[N + 1];
#pragma unroll
  for (int k = 0; k <= N; ++k) r[k] = base[k];
#pragma unroll
  for (int k = 0; k < N; ++k) w[k] = __funnelshift_r(r[k], r[k + 1], shift);
}

// Block32's levels from its packed words (four signed bytes each).
__device__ __forceinline__ void unpack_levels(Block32& o) {
#pragma unroll
  for (int k = 0; k < 8; ++k) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o.lv[4 * k + e] = static_cast<int8_t>(o.packed[k] >> (8 * e));
  }
}


template <>
__device__ __forceinline__ void decode32<static_cast<int>(QuantType::Q8_0)>(const uint8_t* row, int64_t, int64_t b, bool, const int16_t*,
                                                                           Block32& o) {
  const uint8_t* blk = row + 34 * b;
  const float d = half_at(blk);
  load_words<8>(blk + 2, o.packed);
  unpack_levels(o);
  o.scale_lo = o.scale_hi = d;
  o.min_term = 0.0f;
}

template <>
__device__ __forceinline__ void decode32<static_cast<int>(QuantType::Q4_0)>(const uint8_t* row, int64_t, int64_t b, bool, const int16_t*,
                                                                           Block32& o) {
  const uint8_t* blk = row + 18 * b;
  const float d = half_at(blk);
  uint32_t w[4];
  load_words<4>(blk + 2, w);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    o.packed[k] = __vsub4(w[k] & 0x0F0F0F0Fu, 0x08080808u);
    o.packed[4 + k] = __vsub4((w[k] >> 4) & 0x0F0F0F0Fu, 0x08080808u);
  }
  unpack_levels(o);
  o.scale_lo = o.scale_hi = d;
  o.min_term = 0.0f;
}

// kquant_scale_min of sub-blocks 2jp and 2jp + 1 of a Q4_K/Q5_K super-block whose 16-byte header (d,
// dmin, scales[12]) is `head`, by byte permutes of its words: bytes sc(2jp), sc(2jp + 1), m(2jp),
// m(2jp + 1). Read from a byte array at a run-time index, the header went through local memory (a
// store and byte loads on each lane's critical path; q4_k decode tg128 379 -> 405 tok/s).
__device__ __forceinline__ uint32_t kquant_scale_min_pair(const uint4& head, int jp) {
  const uint32_t jj = (2 * jp) & 3;
  const uint32_t raw = __byte_perm(head.y, head.z, jj | ((jj + 1) << 4) | ((jj + 4) << 8) | ((jj + 5) << 12));
  if (jp < 2) return raw & 0x3F3F3F3Fu;  // sub-blocks 0-3: the low 6 bits of scales[j] and scales[j + 4]
  // 4-7: a nibble of scales[j + 4] and the top 2 bits of scales[j - 4] / scales[j]
  const uint32_t c = __byte_perm(head.w, 0, jj | ((jj + 1) << 4) | (jj << 8) | ((jj + 1) << 12));
  return (c & 0x00000F0Fu) | ((c >> 4) & 0x0F0F0000u) | ((raw >> 2) & 0x30303030u);
}
__device__ __forceinline__ float half_lo(uint32_t w) { return __half2float(__ushort_as_half(static_cast<uint16_t>(w & 0xFFFF))); }
__device__ __forceinline__ float half_hi(uint32_t w) { return __half2float(__ushort_as_half(static_cast<uint16_t>(w >> 16))); }

template <bool kQ5>
__device__ __forceinline__ void decode32_k45(const uint8_t* row, int64_t b, Block32& o) {
  const int64_t sb = b / 8;
  const int j = static_cast<int>(b % 8);
  const uint8_t* blk = row + (kQ5 ? 176 : 144) * sb;  // 16-byte aligned (rows are whole super-blocks)
  const uint4 head = *reinterpret_cast<const uint4*>(blk);
  const float d = half_lo(head.x);
  const float dmin = half_hi(head.x);
  const uint32_t scales = kquant_scale_min_pair(head, j / 2) >> (8 * (j % 2));
  const uint32_t sc = scales & 0xFF, m = (scales >> 16) & 0xFF;
  const uint4* qs = reinterpret_cast<const uint4*>(blk + (kQ5 ? 48 : 16) + 32 * (j / 2));
  const uint4 q0 = qs[0], q1 = qs[1];
  const uint32_t words[8] = {q0.x, q0.y, q0.z, q0.w, q1.x, q1.y, q1.z, q1.w};
  const int shift = 4 * (j % 2);
  uint32_t hw[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  if (kQ5) {
    const uint4* qh = reinterpret_cast<const uint4*>(blk + 16);
    const uint4 h0 = qh[0], h1 = qh[1];
    const uint32_t hws[8] = {h0.x, h0.y, h0.z, h0.w, h1.x, h1.y, h1.z, h1.w};
#pragma unroll
    for (int k = 0; k < 8; ++k) hw[k] = ((hws[k] >> j) & 0x01010101u) << 4;
  }
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const uint32_t v = ((words[k] >> shift) & 0x0F0F0F0Fu) | hw[k];
    o.packed[k] = v;
    o.lv[4 * k] = v & 0xFF;
    o.lv[4 * k + 1] = (v >> 8) & 0xFF;
    o.lv[4 * k + 2] = (v >> 16) & 0xFF;
    o.lv[4 * k + 3] = v >> 24;
  }
  o.scale_lo = o.scale_hi = d * static_cast<float>(sc);
  o.min_term = -dmin * static_cast<float>(m);
}

template <>
__device__ __forceinline__ void decode32<static_cast<int>(QuantType::Q4_K)>(const uint8_t* row, int64_t, int64_t b, bool, const int16_t*,
                                                                           Block32& o) {
  decode32_k45<false>(row, b, o);
}
template <>
__device__ __forceinline__ void decode32<static_cast<int>(QuantType::Q5_K)>(const uint8_t* row, int64_t, int64_t b, bool, const int16_t*,
                                                                           Block32& o) {
  decode32_k45<true>(row, b, o);
}

template <>
__device__ __forceinline__ void decode32<static_cast<int>(QuantType::Q6_K)>(const uint8_t* row, int64_t, int64_t b, bool, const int16_t*,
                                                                           Block32& o) {
  const int64_t sb = b / 8;
  const int e0 = static_cast<int>(b % 8) * 32;  // first element within the super-block
  const uint8_t* blk = row + 210 * sb;
  const int h = e0 / 128, quad = (e0 % 128) / 32;
  const uint8_t* ql = blk + 64 * h + 32 * (quad & 1);
  const uint8_t* qh = blk + 128 + 32 * h;
  const int nib_shift = quad < 2 ? 0 : 4, hshift = 2 * quad;
  uint32_t lw[8], hw[8];
  load_words<8>(ql, lw);
  load_words<8>(qh, hw);
#pragma unroll
  for (int k = 0; k < 8; ++k)
    o.packed[k] = __vsub4(((lw[k] >> nib_shift) & 0x0F0F0F0Fu) | (((hw[k] >> hshift) & 0x03030303u) << 4), 0x20202020u);
  unpack_levels(o);
  const float d = half_at(blk + 208);
  const int8_t* scales = reinterpret_cast<const int8_t*>(blk + 192);
  const int k0 = e0 / 16;  // sub-blocks of 16
  o.scale_lo = d * static_cast<float>(scales[k0]);
  o.scale_hi = d * static_cast<float>(scales[k0 + 1]);
  o.min_term = 0.0f;
}

template <>
__device__ __forceinline__ void decode32<static_cast<int>(QuantType::INT8)>(const uint8_t* row, int64_t cols, int64_t b, bool, const int16_t*,
                                                                           Block32& o) {
  const int8_t* q = reinterpret_cast<const int8_t*>(row + 4);
  if (32 * b + 32 <= cols) {  // whole block: 4-byte loads (the row's int8 part starts 4-byte aligned)
    const uint32_t* w = reinterpret_cast<const uint32_t*>(q + 32 * b);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      o.packed[k] = w[k];
#pragma unroll
      for (int e = 0; e < 4; ++e) o.lv[4 * k + e] = static_cast<int8_t>(w[k] >> (8 * e));
    }
  } else {
#pragma unroll
    for (int i = 0; i < 32; ++i) o.lv[i] = 32 * b + i < cols ? q[32 * b + i] : 0;
#pragma unroll
    for (int k = 0; k < 8; ++k)
      o.packed[k] = (o.lv[4 * k] & 0xFF) | ((o.lv[4 * k + 1] & 0xFF) << 8) | ((o.lv[4 * k + 2] & 0xFF) << 16) |
                    (static_cast<uint32_t>(o.lv[4 * k + 3] & 0xFF) << 24);
  }
  o.scale_lo = o.scale_hi = f32_at(row) / 127.0f;
  o.min_term = 0.0f;
}

// 64-weight block blk of a bitsandbytes 4-bit row: its absmax (the nested one applied with double
// quantization), and N words of its 32 code bytes from byte `from` on.
template <int N>
__device__ __forceinline__ float bnb4_block(const uint8_t* row, int64_t cols, bool dq, int64_t blk, int from,
                                            uint32_t* w) {
  if (!dq) {  // 36-byte blocks: 4-byte aligned
    const uint32_t* cw = reinterpret_cast<const uint32_t*>(row + 36 * blk + 4 + from);
#pragma unroll
    for (int k = 0; k < N; ++k) w[k] = cw[k];
    return *reinterpret_cast<const float*>(row + 36 * blk);
  }
  // 33-byte blocks after a 4 + 4 * groups header: any alignment
  const int64_t ngroups = (cols / 64 + 255) / 256;
  const uint8_t* p = row + 4 + 4 * ngroups + 33 * blk;
  load_words<N>(p + 1 + from, w);
  return c_dynamic_map[p[0]] * f32_at(row + 4 + 4 * (blk / 256)) + f32_at(row);
}

// book: the format's Q1.14 codebook in shared memory (constant memory serialises divergent lookups).
__device__ __forceinline__ void decode32_bnb(const uint8_t* row, int64_t cols, int64_t b, bool dq, const int16_t* book,
                                             Block32& o) {
  uint32_t w4[4];
  const float absmax = bnb4_block<4>(row, cols, dq, b / 2, 16 * static_cast<int>(b % 2), w4);
  uint8_t cb[16];
  memcpy(cb, w4, 16);
#pragma unroll
  for (int k = 0; k < 16; ++k) {  // element 2k in the HIGH nibble of byte k
    o.lv[2 * k] = book[cb[k] >> 4];
    o.lv[2 * k + 1] = book[cb[k] & 0xF];
    o.pairs[k] = static_cast<uint16_t>(o.lv[2 * k]) | (static_cast<uint32_t>(o.lv[2 * k + 1]) << 16);
  }
  o.scale_lo = o.scale_hi = absmax * (1.0f / 16384.0f);
  o.min_term = 0.0f;
}
template <>
__device__ __forceinline__ void decode32<static_cast<int>(QuantType::NF4)>(const uint8_t* row, int64_t cols, int64_t b, bool dq, const int16_t* book,
                                                                          Block32& o) {
  decode32_bnb(row, cols, b, dq, book, o);
}
template <>
__device__ __forceinline__ void decode32<static_cast<int>(QuantType::FP4)>(const uint8_t* row, int64_t cols, int64_t b, bool dq, const int16_t* book,
                                                                          Block32& o) {
  decode32_bnb(row, cols, b, dq, book, o);
}

// ---------------------------------------------------------------------------------------------
// Activations quantized per 32 columns exactly as quantize_activations (qgemm_impl.h): d = absmax/127,
// q = round-half-even(x * (1/d)), plus the sum of the 32 quants. One warp per (token, block).
// Layout: q [t][nblk*32], d [t][nblk], s [t][nblk].

// One activation per lane of a warp whose lanes hold the 32 columns of block b of token t.
__device__ __forceinline__ void quantize_lane(float v, int lane, int64_t t, int64_t b, int64_t nblk, int8_t* q, float* d,
                                              int* s) {
  float amax = fabsf(v);
#pragma unroll
  for (int o = 16; o > 0; o /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  const float dd = amax / 127.0f;
  const float id = dd != 0.0f ? 1.0f / dd : 0.0f;
  const int qi = __float2int_rn(v * id);
  q[t * nblk * 32 + 32 * b + lane] = static_cast<int8_t>(qi);
  int sum = qi;
#pragma unroll
  for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0) {
    d[t * nblk + b] = dd;
    s[t * nblk + b] = sum;
  }
}

// The same with two activations per lane, columns 2l and 2l + 1 of block b in lane l of a 16-lane half
// of the warp (the other half holds another block; every lane calling). Identical results: the same
// absmax, scale and rounding, and an integer sum. Only `store` lanes write.
__device__ __forceinline__ void quantize_pair(float v0, float v1, int lane, int64_t b, bool store, int8_t* q, float* d, int* s) {
  float amax = fmaxf(fabsf(v0), fabsf(v1));
#pragma unroll
  for (int o = 8; o > 0; o /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  const float dd = amax / 127.0f;
  const float id = dd != 0.0f ? 1.0f / dd : 0.0f;
  const int q0 = __float2int_rn(v0 * id), q1 = __float2int_rn(v1 * id);
  int sum = q0 + q1;
#pragma unroll
  for (int o = 8; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (!store) return;
  *reinterpret_cast<char2*>(q + 32 * b + 2 * (lane % 16)) = make_char2(static_cast<signed char>(q0), static_cast<signed char>(q1));
  if (lane % 16 == 0) {
    d[b] = dd;
    s[b] = sum;
  }
}

__global__ void quantize_act_kernel(const float* x, int64_t cols, int64_t nblk, int64_t n_tokens, int8_t* q, float* d,
                                    int* s) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp >= n_tokens * nblk) return;
  const int64_t t = warp / nblk, b = warp % nblk, c = 32 * b + lane;
  quantize_lane(c < cols ? x[t * cols + c] : 0.0f, lane, t, b, nblk, q, d, s);
}

// The warp's per-lane partial sums of one output row, for each token: reduced and stored by lane 0.
template <int NT>
__device__ __forceinline__ void store_row_sums(const float* acc, int64_t n_tokens, int64_t rows, int64_t row, int lane,
                                               float* y) {
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    if (t >= n_tokens) break;
    float v = acc[t];
#pragma unroll
    for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) y[t * rows + row] = v;
  }
}

// Matrices of one format that multiply the same activations (q/k/v, gate/up): one launch covers
// their rows back to back, so small ones (k, v) do not run alone on a mostly idle GPU.
struct QJob {
  const uint8_t* w;
  size_t row_bytes;
  int64_t rows;
  bool dq;
  float* y;
};
struct QJobs {
  QJob job[3];
  int count;
  int64_t total_rows;
};

// The job of row `row` of a group, and the row within it (false past the last job's rows).
__device__ __forceinline__ bool locate_row(const QJobs& jobs, int64_t& row, QJob& job) {
  int j = 0;
  while (j < jobs.count && row >= jobs.job[j].rows) row -= jobs.job[j++].rows;
  if (j == jobs.count) return false;
  // Constant indices keep the jobs in parameter space (a dynamic index copies them to local memory).
  job = j == 0 ? jobs.job[0] : j == 1 ? jobs.job[1] : jobs.job[2];
  return true;
}

// Programmatic dependent launch (sm_90). In a one-token decode step the matvecs and the norm,
// attention and activation kernels between them are launched as dependents of the kernel before
// (BIOQUANT_CUDA_PDL=2: plain launches): their blocks may be placed while that one finishes, and
// wait for it (griddepcontrol.wait: its grid complete, its writes visible) before touching memory,
// which hides part of the launch latency between the ~250 kernels of a step. Without the attribute
// the instructions return at once. The small kernels let the matvec after them start as
// soon as they run; a matvec lets the kernel after it start when it ends (letting it start early,
// its blocks then waiting beside the matvec's, measured 3-7% slower).
__device__ __forceinline__ void await_then_allow() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
// The matvecs' blocks among the grid's last c_early_blocks (2 per SM) let the kernel after them launch
// at their start; the others when they end. The next kernel's blocks are then placed while the last
// ones drain, and wait (griddepcontrol.wait still waits for the whole grid), without taking slots that
// blocks of the matvec still need: all blocks letting it launch at their start measured 3-7% slower
// (H100), 4 per SM (every block of a one-wave matvec) no faster than none. H200, 8B, tg128, same call:
// q4_k 520 -> 531-533 tok/s (1 per SM 525, 3 per SM 529.5), nf4 408.6 -> 414.1 (BIOQUANT_CUDA_EARLY=N:
// N - 1 per SM; 1: none).
__device__ __forceinline__ void allow_dependents_in_last_wave() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (gridDim.x - blockIdx.x <= c_early_blocks) asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void await_inputs() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Asynchronous copies into shared memory (sm_80+): issued, committed as groups, then waited for with cp_async_wait_group
// (each thread its own; a __syncthreads after makes them visible to the block).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(gmem) : "memory");
}
// Copies issued since the last commit form a group; wait until at most `pending` groups are in flight.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int pending>
__device__ __forceinline__ void cp_async_wait_group() { asm volatile("cp.async.wait_group %0;" ::"n"(pending) : "memory"); }

// Quantized matmul: one warp per output row, lanes over activation blocks, up to NT tokens per pass
// (the row's blocks are decoded once per pass).
// Block b's contribution for one token whose 32 int8 activations are (qa, qb), with scale dx and
// quant sum sx: dx * (scale_lo * isum(0..15) + scale_hi * isum(16..31) + min_term * sx), the integer
// sums by dp4a where the levels fit signed bytes (q4_k/q5_k levels < 32 read the same; int8 are).
template <int T>
__device__ __forceinline__ float block_dot(const Block32& blk, int4 qa, int4 qb, float dx, float sx) {
  int lo = 0, hi = 0;
  if constexpr (T != static_cast<int>(QuantType::NF4) && T != static_cast<int>(QuantType::FP4)) {
    const int qw[8] = {qa.x, qa.y, qa.z, qa.w, qb.x, qb.y, qb.z, qb.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) lo = __dp4a(static_cast<int>(blk.packed[k]), qw[k], lo);
#pragma unroll
    for (int k = 4; k < 8; ++k) hi = __dp4a(static_cast<int>(blk.packed[k]), qw[k], hi);
  } else {  // nf4/fp4: 16-bit levels two at a time against two activation bytes (dp2a)
    const int qw[8] = {qa.x, qa.y, qa.z, qa.w, qb.x, qb.y, qb.z, qb.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      lo = __dp2a_lo(static_cast<int>(blk.pairs[2 * k]), qw[k], lo);
      lo = __dp2a_hi(static_cast<int>(blk.pairs[2 * k + 1]), qw[k], lo);
      hi = __dp2a_lo(static_cast<int>(blk.pairs[2 * k + 8]), qw[k + 4], hi);
      hi = __dp2a_hi(static_cast<int>(blk.pairs[2 * k + 9]), qw[k + 4], hi);
    }
  }
  return dx * (blk.scale_lo * static_cast<float>(lo) + blk.scale_hi * static_cast<float>(hi) + blk.min_term * sx);
}

template <int T, int NT, int U>
__device__ __forceinline__ void qmatmul_row(const QJobs& jobs, int64_t row, int64_t cols, const int16_t* book,
                                            const int8_t* q, const float* d, const int* s, int64_t nblk, int64_t n_tokens) {
  const int lane = threadIdx.x % 32;
  QJob job;
  if (!locate_row(jobs, row, job)) return;
  const bool dq = job.dq;
  const int64_t rows = job.rows;
  float* y = job.y;
  const uint8_t* wr = job.w + row * job.row_bytes;
  const int64_t wblk = (cols + 31) / 32;  // blocks that hold weights
  float acc[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t] = 0.0f;
  // U = 0: the compiler's own unrolling (measured best for most formats); else unrolled U times.
  const auto block = [&](int64_t b) {
    Block32 blk;
    decode32<T>(wr, cols, b, dq, book, blk);
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      if (t >= n_tokens) break;
      const int4* qv = reinterpret_cast<const int4*>(q + t * nblk * 32 + 32 * b);
      const int4 qa = qv[0], qb = qv[1];  // two 16-byte loads
      acc[t] += block_dot<T>(blk, qa, qb, d[t * nblk + b], static_cast<float>(s[t * nblk + b]));
    }
  };
  if constexpr (U == 0) {
    for (int64_t b = lane; b < wblk; b += 32) block(b);
  } else {
#pragma unroll U
    for (int64_t b = lane; b < wblk; b += 32) block(b);
  }
  store_row_sums<NT>(acc, n_tokens, rows, row, lane, y);
}

// One token, R adjacent rows per warp: each activation block is loaded once for R rows (the
// activations, re-read by every row, otherwise load the L1 more than the weights do).
template <int T, int R>
__device__ __forceinline__ void qmatvec_rows(const QJobs& jobs, int64_t row, int64_t cols, const int16_t* book,
                                             const int8_t* q, const float* d, const int* s) {
  const int lane = threadIdx.x % 32;
  QJob job;
  if (!locate_row(jobs, row, job)) return;
  const int64_t wblk = (cols + 31) / 32;
  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.0f;
  for (int64_t b = lane; b < wblk; b += 32) {
    const int4* qv = reinterpret_cast<const int4*>(q + 32 * b);
    const int4 qa = qv[0], qb = qv[1];
    const float dx = d[b], sx = static_cast<float>(s[b]);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      Block32 blk;
      decode32<T>(job.w + (row + r) * job.row_bytes, cols, b, job.dq, book, blk);
      acc[r] += block_dot<T>(blk, qa, qb, dx, sx);
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) store_row_sums<1>(&acc[r], 1, job.rows, row + r, lane, job.y);
}

template <int T, int R>
__global__ void qmatvec_kernel(QJobs jobs, int64_t cols, const int8_t* q, const float* d, const int* s) {
  allow_dependents_in_last_wave();
  await_inputs();
  __shared__ int16_t book[16];
  if constexpr (T == static_cast<int>(QuantType::NF4) || T == static_cast<int>(QuantType::FP4)) {
    if (threadIdx.x < 16) book[threadIdx.x] = (T == static_cast<int>(QuantType::NF4) ? c_nf4_q14 : c_fp4_q14)[threadIdx.x];
    __syncthreads();
  }
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
  for (int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; r * R < jobs.total_rows; r += warps)
    qmatvec_rows<T, R>(jobs, r * R, cols, book, q, d, s);
}

// A warp per row (grid stride when the grid is smaller than the rows).
template <int T, int NT, int U = 0>
__global__ void qmatmul_kernel(QJobs jobs, int64_t cols, const int8_t* q, const float* d, const int* s, int64_t nblk,
                               int64_t n_tokens) {
  allow_dependents_in_last_wave();
  await_inputs();
  __shared__ int16_t book[16];
  if constexpr (T == static_cast<int>(QuantType::NF4) || T == static_cast<int>(QuantType::FP4)) {
    if (threadIdx.x < 16) book[threadIdx.x] = (T == static_cast<int>(QuantType::NF4) ? c_nf4_q14 : c_fp4_q14)[threadIdx.x];
    __syncthreads();
  }
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
  for (int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; r < jobs.total_rows; r += warps)
    qmatmul_row<T, NT, U>(jobs, r, cols, book, q, d, s, nblk, n_tokens);
}

// q4_k decode (one token): a lane takes the two 32-blocks that share one 32-byte run of qs (low
// and high nibbles), so every weight byte is loaded once; a warp takes R adjacent rows, so each
// activation load serves R rows (the activations, re-read by every row, otherwise load the L1 more
// than the weights do); dp4a dot products.
// Shared-memory copy of one token's int8 activations for the q4_k and nf4/fp4 decode kernels. Lane p
// reads the 16-byte chunks 4p..4p+3; stored as is, the 8 lanes a shared load serves at a time would
// hit two of the eight 16-byte bank groups (4-way conflicts). A 16-byte pad after every 8 chunks
// (two lanes' share) spreads them over all eight, and keeps each lane's four chunks adjacent, so
// that they are one address plus constant offsets (an XOR swizzle cost ~12 integer instructions
// per block of the nf4 loop).
__device__ __forceinline__ int act_chunk_slot(int c) { return c + (c >> 3); }
__host__ __device__ constexpr size_t act_shared_bytes(int64_t cols) { return static_cast<size_t>(cols + cols / 8); }

// Integers to floats without I2F, which issues at an eighth of the float rate on sm_90 (with one per
// sum, scale and min it bounded the kernel): the bits of 1.5 * 2^23 plus n read as a float are
// 1.5 * 2^23 + n exactly for |n| < 2^22. The mma adds the offset to its sums as their start value.
constexpr int kMagicInt = 0x4B400000;
constexpr float kMagicFloat = 12582912.0f;
__device__ __forceinline__ float small_int_to_float(int n) { return __int_as_float(n + kMagicInt) - kMagicFloat; }
// Byte i (0..3) of w as a float: one byte permute into the low mantissa byte of 2^23.
template <int i>
__device__ __forceinline__ float byte_to_float(uint32_t w) {
  return __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7650 | i)) - 8388608.0f;
}

// The weights of q4_k pair p of a row: its super-block's header and the 32-byte run of qs.
struct Q4kPairWeights {
  uint4 head, q0, q1;
};
__device__ __forceinline__ Q4kPairWeights load_q4k_pair(const uint8_t* row, int p) {
  const uint8_t* blk = row + 144 * (p >> 2);  // p >= 0
  const uint4* qs = reinterpret_cast<const uint4*>(blk + 16 + 32 * (p & 3));
  return {*reinterpret_cast<const uint4*>(blk), qs[0], qs[1]};
}
constexpr int kQ4kPreload = 2;  // pairs per lane loaded before the activations are waited for

// kPre (R == 1): pre holds the weights of the row's first kQ4kPreload pairs of this lane.
template <int R, bool kShared, bool kPre = false>
__device__ __forceinline__ void q4k_decode_rows(const QJobs& jobs, int64_t row, int64_t cols, const int8_t* q,
                                                const float* d, const int* s, const Q4kPairWeights* pre = nullptr) {
  const int lane = threadIdx.x % 32;
  QJob job;
  if (!locate_row(jobs, row, job)) return;
  const int pairs = static_cast<int>(cols / 64);  // 32-bit index arithmetic (rows are < 2^31 bytes)
  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.0f;
  const auto pair = [&](int p, const Q4kPairWeights* given) {
    const int jp = p & 3;
    const int b0 = 2 * p;
    int4 a0, a1, a2, a3;
    if constexpr (kShared) {
      const int4* a = reinterpret_cast<const int4*>(q) + act_chunk_slot(4 * p);
      a0 = a[0];
      a1 = a[1];
      a2 = a[2];
      a3 = a[3];
    } else {
      const int4* a = reinterpret_cast<const int4*>(q + 32 * b0);
      a0 = a[0];
      a1 = a[1];
      a2 = a[2];
      a3 = a[3];
    }
    const int x0[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
    const int x1[8] = {a2.x, a2.y, a2.z, a2.w, a3.x, a3.y, a3.z, a3.w};
    const float2 dx = reinterpret_cast<const float2*>(d)[p];  // b0 is even: one 8-byte load each
    const int2 sx = reinterpret_cast<const int2*>(s)[p];
    const float dx0 = dx.x, dx1 = dx.y;
    const float sx0 = static_cast<float>(sx.x), sx1 = static_cast<float>(sx.y);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const Q4kPairWeights wt = given != nullptr ? *given : load_q4k_pair(job.w + (row + r) * job.row_bytes, p);
      const uint32_t packed = kquant_scale_min_pair(wt.head, jp);
      const float dd = half_lo(wt.head.x), dmin = half_hi(wt.head.x);
      const float sc0 = static_cast<float>(packed & 0xFF), sc1 = static_cast<float>((packed >> 8) & 0xFF);
      const float m0 = static_cast<float>((packed >> 16) & 0xFF), m1 = static_cast<float>(packed >> 24);
      const uint32_t w[8] = {wt.q0.x, wt.q0.y, wt.q0.z, wt.q0.w, wt.q1.x, wt.q1.y, wt.q1.z, wt.q1.w};
      int lo = 0, hi = 0;
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        lo = __dp4a(static_cast<int>(w[k] & 0x0F0F0F0Fu), x0[k], lo);
        hi = __dp4a(static_cast<int>((w[k] >> 4) & 0x0F0F0F0Fu), x1[k], hi);
      }
      acc[r] += dx0 * (dd * sc0 * static_cast<float>(lo) - dmin * m0 * sx0);
      acc[r] += dx1 * (dd * sc1 * static_cast<float>(hi) - dmin * m1 * sx1);
    }
  };
  int p = lane;
  if constexpr (kPre) {
#pragma unroll
    for (int k = 0; k < kQ4kPreload; ++k, p += 32)
      if (p < pairs) pair(p, &pre[k]);
  }
  for (; p < pairs; p += 32) pair(p, nullptr);
#pragma unroll
  for (int r = 0; r < R; ++r) store_row_sums<1>(&acc[r], 1, job.rows, row + r, lane, job.y);
}

// One row of a q4k_decode_tokens_kernel: q4k_decode_rows<1, true> for NT tokens, each weight pair unpacked
// once for all of them; token t's activations at q + t * act_shared_bytes(cols) (shared memory), its scales
// and sums at d / s + t * nblk. pre: the weights of the row's first kQ4kPreload pairs of this lane, or null.
template <int NT>
__device__ __forceinline__ void q4k_decode_tokens_row(const QJobs& jobs, int64_t row, int64_t cols, const int8_t* q,
                                                      const float* d, const int* s, int64_t nblk,
                                                      const Q4kPairWeights* pre) {
  const int lane = threadIdx.x % 32;
  QJob job;
  if (!locate_row(jobs, row, job)) return;
  const int pairs = static_cast<int>(cols / 64);
  float acc[NT] = {};
  const auto pair = [&](int p, const Q4kPairWeights* given) {
    const Q4kPairWeights wt = given != nullptr ? *given : load_q4k_pair(job.w + row * job.row_bytes, p);
    const uint32_t packed = kquant_scale_min_pair(wt.head, p & 3);
    const float dd = half_lo(wt.head.x), dmin = half_hi(wt.head.x);
    const float sc0 = dd * static_cast<float>(packed & 0xFF), sc1 = dd * static_cast<float>((packed >> 8) & 0xFF);
    const float m0 = dmin * static_cast<float>((packed >> 16) & 0xFF), m1 = dmin * static_cast<float>(packed >> 24);
    const uint32_t w[8] = {wt.q0.x, wt.q0.y, wt.q0.z, wt.q0.w, wt.q1.x, wt.q1.y, wt.q1.z, wt.q1.w};
#pragma unroll
    for (int tk = 0; tk < NT; ++tk) {
      const int4* a = reinterpret_cast<const int4*>(q + tk * act_shared_bytes(cols)) + act_chunk_slot(4 * p);
      const int4 a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
      const int x0[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      const int x1[8] = {a2.x, a2.y, a2.z, a2.w, a3.x, a3.y, a3.z, a3.w};
      const float2 dx = reinterpret_cast<const float2*>(d + tk * nblk)[p];  // block 2p is even: 8-byte loads
      const int2 sx = reinterpret_cast<const int2*>(s + tk * nblk)[p];
      int lo = 0, hi = 0;
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        lo = __dp4a(static_cast<int>(w[k] & 0x0F0F0F0Fu), x0[k], lo);
        hi = __dp4a(static_cast<int>((w[k] >> 4) & 0x0F0F0F0Fu), x1[k], hi);
      }
      acc[tk] += dx.x * (sc0 * static_cast<float>(lo) - m0 * static_cast<float>(sx.x));
      acc[tk] += dx.y * (sc1 * static_cast<float>(hi) - m1 * static_cast<float>(sx.y));
    }
  };
  int p = lane;
  if (pre != nullptr) {
#pragma unroll
    for (int k = 0; k < kQ4kPreload; ++k, p += 32)
      if (p < pairs) pair(p, &pre[k]);
  }
  for (; p < pairs; p += 32) pair(p, nullptr);
  store_row_sums<NT>(acc, NT, job.rows, row, lane, job.y);
}

// This lane's first kQ4kPreload weight pairs of row `row` (when the grid has it), for a kernel to load before
// it waits for its inputs.
__device__ __forceinline__ void preload_q4k_pairs(const QJobs& jobs, int64_t row, int64_t cols, Q4kPairWeights* pre) {
  QJob job;
  if (!locate_row(jobs, row, job)) return;
#pragma unroll
  for (int k = 0; k < kQ4kPreload; ++k) {
    const int p = static_cast<int>(threadIdx.x % 32) + 32 * k;
    if (p < cols / 64) pre[k] = load_q4k_pair(job.w + row * job.row_bytes, p);
  }
}

// A warp per R rows (every job's row count a multiple of R); a grid smaller than that makes each
// warp loop over row groups (grid stride).
// kShared: the block first copies the activations (cols bytes, dynamic shared memory) into shared
// memory (act_chunk_slot order): a lane's four 16-byte activation loads from global memory, 64
// bytes apart across the warp, each touch 16 cache lines; from shared memory they take 4 wavefronts.
// With one row per warp, the weights of the warp's first row (its first kQ4kPreload pairs per lane)
// are loaded before anything is waited for: a dependent launch's blocks placed early (see
// await_inputs) then have them on the way while the kernel before finishes.
template <int R, bool kShared>
__global__ void q4k_decode_kernel(QJobs jobs, int64_t cols, const int8_t* q, const float* d, const int* s) {
  allow_dependents_in_last_wave();
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  Q4kPairWeights pre[kQ4kPreload];
  if constexpr (R == 1) preload_q4k_pairs(jobs, first, cols, pre);
  await_inputs();
  extern __shared__ int4 act_shared[];
  if constexpr (kShared) {
    const int4* src = reinterpret_cast<const int4*>(q);
    for (int c = threadIdx.x; c < cols / 16; c += blockDim.x) act_shared[act_chunk_slot(c)] = src[c];
    __syncthreads();
    q = reinterpret_cast<const int8_t*>(act_shared);
  }
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
  if (first * R < jobs.total_rows) q4k_decode_rows<R, kShared, R == 1>(jobs, first * R, cols, q, d, s, pre);
  for (int64_t r = first + warps; r * R < jobs.total_rows; r += warps) q4k_decode_rows<R, kShared>(jobs, r * R, cols, q, d, s);
}

// The two-token kernels' rows: up to 16K weights, so that both tokens' activations (36 KB) and the nf4/fp4
// permute tables fit the shared memory a block gets without asking (48 KB).
constexpr int64_t kTwoTokensMaxCols = 16 * 1024;
static_assert(2 * act_shared_bytes(kTwoTokensMaxCols) + 4 * kBnb4PermuteWords * 32 <= 48 * 1024,
              "two tokens' activations within the default dynamic shared memory");

// q4_k decode steps of NT sequences (one token each): q4k_decode_kernel's warp per row and lane per weight
// pair, the pair unpacked once for all NT tokens, whose activations are copied into shared memory (NT x
// act_shared_bytes). The mma kernels' 16-row tiles take a warp's super-blocks one after another, and are
// latency-bound with few tokens: a 2-sequence step cost 1.77 times a one-token step. H200, 8B, same call,
// this kernel / q4k_mma_kernel, plain launches: 2 sequences 658 / 607 tok/s, 3: 829 / 880, 4: 930 / 1108;
// as dependent launches (another call) 3: 897 / 932. So it takes steps of two sequences (710 dependent).
template <int NT>
__global__ void q4k_decode_tokens_kernel(QJobs jobs, int64_t cols, const int8_t* q, const float* d, const int* s,
                                         int64_t nblk) {
  allow_dependents_in_last_wave();
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  Q4kPairWeights pre[kQ4kPreload];
  preload_q4k_pairs(jobs, first, cols, pre);
  await_inputs();
  extern __shared__ int4 act_shared[];
  const int64_t chunks = cols / 16, slots = static_cast<int64_t>(act_shared_bytes(cols) / 16);
  const int4* src = reinterpret_cast<const int4*>(q);
  for (int64_t i = threadIdx.x; i < NT * chunks; i += blockDim.x) {
    const int64_t tk = i / chunks, c = i % chunks;
    act_shared[tk * slots + act_chunk_slot(static_cast<int>(c))] = src[tk * (nblk * 2) + c];
  }
  __syncthreads();
  const int8_t* qs = reinterpret_cast<const int8_t*>(act_shared);
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
  if (first < jobs.total_rows) q4k_decode_tokens_row<NT>(jobs, first, cols, qs, d, s, nblk, pre);
  for (int64_t r = first + warps; r < jobs.total_rows; r += warps) q4k_decode_tokens_row<NT>(jobs, r, cols, qs, d, s, nblk, nullptr);
}

// q4_k for several tokens at once (2-8 per pass: batched decode steps, short prompts) on the tensor
// cores: int8 mma.sync m16n8k32 of the rows' 4-bit levels (0..15, signed bytes as they are) against
// the tokens' int8 activations. One mma per 32-weight sub-block gives exactly the integer sums the
// dp4a kernels compute, each then scaled as theirs are: dx * (d * sc * S - dmin * m * sx). The dp4a
// kernels pay their unpacking, dp4a and scales once per token; here one mma serves 8 tokens.
// A block takes 16 rows; its 8 warps split their super-blocks (warp w: w, w + 8, ...), and the warps'
// partial sums are added in warp order through shared memory (the same result every run).
// Fragments (PTX ISA, m16n8k32 .s8): lane (g, t) = (lane / 4, lane % 4) holds A's rows g and g + 8
// at k = 4t..4t+3 (a0, a1) and 16+4t..16+4t+3 (a2, a3), B's column g at the same k (b0, b1), and C's
// rows g and g + 8 at columns 2t and 2t + 1. The order of k inside one mma is free when A and B
// agree: lane t takes weights 8t..8t+7 of the sub-block (one 8-byte load of the 32-byte run whose
// low and high nibbles hold a pair of sub-blocks) and the same 8 activations.
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

// kQ5: q5_k super-blocks (176 bytes: the same header, then 32 bytes of fifth bits, then the nibbles), weight e
// of sub-block j having bit j of fifth-bit byte e: lane t's bytes 8t..8t+7 of them, one 8-byte load per row.
// Its 16-token kernel held to two blocks per SM (148 registers left one): H200, 8B, same call, 12 sequences
// 1943 against 1419 tok/s, 16: 2222 / 1787, 24: 2132 / 1792. A minimum of 0 is none (q4_k's kernels as before).
template <int NTILE, bool kQ5 = false>
__global__ void __launch_bounds__(256, kQ5 && NTILE == 2 ? 2 : 0)
    q4k_mma_kernel(QJobs jobs, int64_t cols, const int8_t* q, const float* d, const int* s, int64_t nblk, int64_t n_tokens) {
  BQ_MMA_TILE_PROLOGUE(NTILE);
  constexpr int kBlockBytes = kQ5 ? 176 : 144, kNibbles = kQ5 ? 48 : 16;
  const MmaTokens<NTILE> tok(g, t, n_tokens, q, d, s, nblk);
  float acc[NTILE][4] = {};
  const int superblocks = static_cast<int>(cols / 256);
  for (int sb = warp; sb < superblocks; sb += 8) {
    const uint8_t* bg = wg + kBlockBytes * static_cast<int64_t>(sb);
    const uint8_t* bg8 = wg8 + kBlockBytes * static_cast<int64_t>(sb);
    const uint4 hg = *reinterpret_cast<const uint4*>(bg), hg8 = *reinterpret_cast<const uint4*>(bg8);
    uint2 wa[4], wb[4];
#pragma unroll
    for (int jp = 0; jp < 4; ++jp) {
      wa[jp] = *reinterpret_cast<const uint2*>(bg + kNibbles + 32 * jp + 8 * t);
      wb[jp] = *reinterpret_cast<const uint2*>(bg8 + kNibbles + 32 * jp + 8 * t);
    }
    uint2 fa = make_uint2(0u, 0u), fb = make_uint2(0u, 0u);  // q5_k: the fifth bits
    if constexpr (kQ5) {
      fa = *reinterpret_cast<const uint2*>(bg + 16 + 8 * t);
      fb = *reinterpret_cast<const uint2*>(bg8 + 16 + 8 * t);
    }
    const float dg = half_lo(hg.x), mg = half_hi(hg.x), dg8 = half_lo(hg8.x), mg8 = half_hi(hg8.x);
#pragma unroll
    for (int jp = 0; jp < 4; ++jp) {
      const int b0 = 8 * sb + 2 * jp;  // even: the pair's scales are one 8-byte load per token
      const uint32_t pg = kquant_scale_min_pair(hg, jp), pg8 = kquant_scale_min_pair(hg8, jp);
      float2 dx0[NTILE], dx1[NTILE];
      int2 sx0[NTILE], sx1[NTILE];
#pragma unroll
      for (int n = 0; n < NTILE; ++n) {
        dx0[n] = tok.has_c0[n] ? *reinterpret_cast<const float2*>(tok.dx0[n] + b0) : make_float2(0.0f, 0.0f);
        dx1[n] = tok.has_c1[n] ? *reinterpret_cast<const float2*>(tok.dx1[n] + b0) : make_float2(0.0f, 0.0f);
        sx0[n] = tok.has_c0[n] ? *reinterpret_cast<const int2*>(tok.sx0[n] + b0) : make_int2(0, 0);
        sx1[n] = tok.has_c1[n] ? *reinterpret_cast<const int2*>(tok.sx1[n] + b0) : make_int2(0, 0);
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int b = b0 + h;
        const int shift = 4 * h;
        uint32_t a0 = (wa[jp].x >> shift) & 0x0F0F0F0Fu, a1 = (wb[jp].x >> shift) & 0x0F0F0F0Fu;
        uint32_t a2 = (wa[jp].y >> shift) & 0x0F0F0F0Fu, a3 = (wb[jp].y >> shift) & 0x0F0F0F0Fu;
        if constexpr (kQ5) {
          const int j = 2 * jp + h;
          a0 |= ((fa.x >> j) & 0x01010101u) << 4;
          a1 |= ((fb.x >> j) & 0x01010101u) << 4;
          a2 |= ((fa.y >> j) & 0x01010101u) << 4;
          a3 |= ((fb.y >> j) & 0x01010101u) << 4;
        }
        const float scale_g = dg * (h == 0 ? byte_to_float<0>(pg) : byte_to_float<1>(pg));
        const float min_g = mg * (h == 0 ? byte_to_float<2>(pg) : byte_to_float<3>(pg));
        const float scale_g8 = dg8 * (h == 0 ? byte_to_float<0>(pg8) : byte_to_float<1>(pg8));
        const float min_g8 = mg8 * (h == 0 ? byte_to_float<2>(pg8) : byte_to_float<3>(pg8));
#pragma unroll
        for (int n = 0; n < NTILE; ++n) {
          const uint2 x = tok.x8(n, b, 8 * t);
          int c[4];
          mma_s8_m16n8k32(c, a0, a1, a2, a3, x.x, x.y, kMagicInt);
          const float dxa = h == 0 ? dx0[n].x : dx0[n].y, dxb = h == 0 ? dx1[n].x : dx1[n].y;
          const float sxa = small_int_to_float(h == 0 ? sx0[n].x : sx0[n].y);
          const float sxb = small_int_to_float(h == 0 ? sx1[n].x : sx1[n].y);
          // c[i] = kMagicInt + S (|S| <= 32 * 31 * 128 < 2^22)
          acc[n][0] += dxa * (scale_g * (__int_as_float(c[0]) - kMagicFloat) - min_g * sxa);
          acc[n][1] += dxb * (scale_g * (__int_as_float(c[1]) - kMagicFloat) - min_g * sxb);
          acc[n][2] += dxa * (scale_g8 * (__int_as_float(c[2]) - kMagicFloat) - min_g8 * sxa);
          acc[n][3] += dxb * (scale_g8 * (__int_as_float(c[3]) - kMagicFloat) - min_g8 * sxb);
        }
      }
    }
  }
  store_mma_partials<NTILE>(acc, partial, warp, g, t, n_tokens, job.y, job.rows, row0);
}

// bitsandbytes 4-bit decode (one token, nf4 / fp4): a warp per row, a lane per 64-weight block,
// the token's activations in shared memory (act_chunk_slot order, bytes swapped in pairs: see
// below). Each Q1.14 codebook level is split into two signed bytes (level = radix * hi + lo), and
// each byte plane is looked up four codes at a time by two byte permutes, one with the codes as
// they are and one with their top bit flipped (bnb4_permute_tables.h says why two suffice), then
// multiplied by dp4a: the same integer sums as the 16-bit levels. The permute tables sit in
// registers; a plain two-half lookup needed a third permute per plane to select between halves,
// and the integer pipe that runs the permutes bounded the kernel (the dp4a run on the FMA pipe).
// prmt.b32 in its generic mode (a selector's top bit gives the picked byte's sign).
__device__ __forceinline__ uint32_t byte_permute_signed(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}
// Adds the byte-plane sums of the eight weights of code word w (code i = bits 4i..4i+3) times their
// activations x[0..1] to hi and lo. In a byte, the element with the lower index has the HIGH nibble
// (bitsandbytes), so code i belongs to element i ^ 1: the activations are stored with the bytes of
// each pair swapped to match.
__device__ __forceinline__ void bnb4_dot8(const Bnb4PermuteTables& t, uint32_t w, const int* x, int& hi, int& lo) {
  const uint32_t f = w ^ 0x88888888u;
#pragma unroll
  for (int i = 0; i < 2; ++i) {  // codes 4i..4i+3 (a permute reads the selector's low 16 bits)
    const uint32_t wi = w >> (16 * i), fi = f >> (16 * i);
    hi = __dp4a(static_cast<int>(byte_permute_signed(t.hi_direct[0], t.hi_direct[1], wi)), x[i], hi);
    hi = __dp4a(static_cast<int>(byte_permute_signed(t.hi_flipped[0], t.hi_flipped[1], fi)), x[i], hi);
    lo = __dp4a(static_cast<int>(byte_permute_signed(t.lo_direct[0], t.lo_direct[1], wi)), x[i], lo);
    lo = __dp4a(static_cast<int>(byte_permute_signed(t.lo_flipped[0], t.lo_flipped[1], fi)), x[i], lo);
  }
}

// The permute tables from their per-lane copies in shared memory (kBnb4PermuteWords x 32 words, word i of
// lane l at 32 i + l). Each lane reads its own copy, so that they sit in vector registers: values the
// compiler can see are warp-uniform it kept partly in uniform registers, which PRMT cannot read, and paid a
// move before each lookup (57 moves in the loop over a 64-weight block, in the SASS).
__device__ __forceinline__ Bnb4PermuteTables lane_permute_tables(const uint32_t* tables_shared, int lane) {
  Bnb4PermuteTables tables;
  const uint32_t* mine = tables_shared + lane;
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    tables.hi_direct[k] = mine[32 * k];
    tables.hi_flipped[k] = mine[32 * (2 + k)];
    tables.lo_direct[k] = mine[32 * (4 + k)];
    tables.lo_flipped[k] = mine[32 * (6 + k)];
  }
  tables.radix = static_cast<int32_t>(tables_shared[32 * 8]);
  return tables;
}

// kPipelined: each lane's next block is loaded while it multiplies the current one, and the warp's
// first row's first block before the wait (the weights are never written by kernels; +1-2%).
// At most 64 registers (four blocks per SM): unbounded, the compiler took 90 (two blocks) and nf4
// decoded at 313 tok/s against 347-354 (H100).
template <int T, bool kPipelined = false>
__global__ void __launch_bounds__(256, 4) bnb4_decode_kernel(QJobs jobs, int64_t cols, const int8_t* q, const float* d,
                                   const int* /*s: no minimum term*/) {
  allow_dependents_in_last_wave();
  const int lane = threadIdx.x % 32;
  const int nb = static_cast<int>(cols / 64);  // cols <= 32K (the launch checks)
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  uint32_t next[8];
  float next_absmax = 0.0f;
  if constexpr (kPipelined) {
    int64_t row = first;
    QJob job;
    if (first < jobs.total_rows && locate_row(jobs, row, job) && lane < nb)
      next_absmax = bnb4_block<8>(job.w + row * job.row_bytes, cols, job.dq, lane, 0, next);
  }
  await_inputs();
  extern __shared__ int4 act_shared[];
  __shared__ uint32_t tables_shared[kBnb4PermuteWords * 32];  // a copy per lane: see below
  {
    const int4* src = reinterpret_cast<const int4*>(q);
    for (int c = threadIdx.x; c < cols / 16; c += blockDim.x) {
      int4 v = src[c];
      v.x = static_cast<int>(__byte_perm(v.x, 0, 0x2301));
      v.y = static_cast<int>(__byte_perm(v.y, 0, 0x2301));
      v.z = static_cast<int>(__byte_perm(v.z, 0, 0x2301));
      v.w = static_cast<int>(__byte_perm(v.w, 0, 0x2301));
      act_shared[act_chunk_slot(c)] = v;
    }
    const uint32_t* permute = T == static_cast<int>(QuantType::NF4) ? c_nf4_permute : c_fp4_permute;
    for (int i = threadIdx.x; i < kBnb4PermuteWords * 32; i += blockDim.x) tables_shared[i] = permute[i / 32];
    __syncthreads();
  }
  Bnb4PermuteTables tables = lane_permute_tables(tables_shared, lane);
  bool preloaded = kPipelined;
  for (int64_t r = first; r < jobs.total_rows; r += warps) {
    int64_t row = r;
    QJob job;
    if (!locate_row(jobs, row, job)) break;
    const uint8_t* wr = job.w + row * job.row_bytes;
    float acc = 0.0f;
    if constexpr (kPipelined)
      if (!preloaded && lane < nb) next_absmax = bnb4_block<8>(wr, cols, job.dq, lane, 0, next);
    preloaded = false;
    for (int p = lane; p < nb; p += 32) {  // 32-bit index arithmetic (cols <= 32K here)
      uint32_t w[8];
      float scale;
      if constexpr (kPipelined) {  // this block's words were loaded last iteration; the next one's go out now
#pragma unroll
        for (int k = 0; k < 8; ++k) w[k] = next[k];
        scale = next_absmax * (1.0f / 16384.0f);
        if (p + 32 < nb) next_absmax = bnb4_block<8>(wr, cols, job.dq, p + 32, 0, next);
      } else {
        scale = bnb4_block<8>(wr, cols, job.dq, p, 0, w) * (1.0f / 16384.0f);
      }
      const int4* a = act_shared + act_chunk_slot(4 * p);
      const int4 a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
      const int x[16] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w, a2.x, a2.y, a2.z, a2.w, a3.x, a3.y, a3.z, a3.w};
      const float2 dx = reinterpret_cast<const float2*>(d)[p];  // the two 32-blocks' scales: one 8-byte load
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // the block's two 32-blocks: elements 0-15 (lo) and 16-31 (hi) of each
        int lo_hi = 0, lo_lo = 0, hi_hi = 0, hi_lo = 0;  // (32-block half, byte plane)
        bnb4_dot8(tables, w[4 * h], x + 8 * h, lo_hi, lo_lo);
        bnb4_dot8(tables, w[4 * h + 1], x + 8 * h + 2, lo_hi, lo_lo);
        bnb4_dot8(tables, w[4 * h + 2], x + 8 * h + 4, hi_hi, hi_lo);
        bnb4_dot8(tables, w[4 * h + 3], x + 8 * h + 6, hi_hi, hi_lo);
        const int lo = tables.radix * lo_hi + lo_lo, hi = tables.radix * hi_hi + hi_lo;
        acc += (h == 0 ? dx.x : dx.y) * (scale * static_cast<float>(lo) + scale * static_cast<float>(hi));  // no minimum
      }
    }
    store_row_sums<1>(&acc, 1, job.rows, row, lane, job.y);
  }
}

// bnb4_dot8 for NT tokens: the eight codes of w looked up once, against each token's two activation words x[t].
template <int NT>
__device__ __forceinline__ void bnb4_dot8_tokens(const Bnb4PermuteTables& t, uint32_t w, const int* const (&x)[NT],
                                                 int (&hi)[NT], int (&lo)[NT]) {
  const uint32_t f = w ^ 0x88888888u;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const uint32_t wi = w >> (16 * i), fi = f >> (16 * i);
    const int hd = static_cast<int>(byte_permute_signed(t.hi_direct[0], t.hi_direct[1], wi));
    const int hf = static_cast<int>(byte_permute_signed(t.hi_flipped[0], t.hi_flipped[1], fi));
    const int ld = static_cast<int>(byte_permute_signed(t.lo_direct[0], t.lo_direct[1], wi));
    const int lf = static_cast<int>(byte_permute_signed(t.lo_flipped[0], t.lo_flipped[1], fi));
#pragma unroll
    for (int k = 0; k < NT; ++k) {
      const int xi = x[k][i];
      hi[k] = __dp4a(hf, xi, __dp4a(hd, xi, hi[k]));
      lo[k] = __dp4a(lf, xi, __dp4a(ld, xi, lo[k]));
    }
  }
}

// nf4 / fp4 decode steps of NT sequences (one token each): bnb4_decode_kernel's warp per row and lane per
// 64-weight block, each block's codes looked up once for all NT tokens (the byte permutes bound the
// one-token kernel; the dp4a per token are the added work). The tokens' activations sit in shared memory,
// NT x act_shared_bytes, each pair of bytes swapped as there. kPipelined as there. H200, 8B, same call, this
// kernel / bnb4_mma_kernel, 2 sequences: nf4 613 / 486 tok/s, fp4 613 / 485, nf4 with double quantization 525 / 314.
template <int T, int NT, bool kPipelined>
__global__ void __launch_bounds__(256, 3) bnb4_decode_tokens_kernel(QJobs jobs, int64_t cols, const int8_t* q,
                                                                    const float* d, int64_t nblk) {
  allow_dependents_in_last_wave();
  const int lane = threadIdx.x % 32;
  const int nb = static_cast<int>(cols / 64);  // cols <= kTwoTokensMaxCols (the launch checks)
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  uint32_t next[8];
  float next_absmax = 0.0f;
  if constexpr (kPipelined) {
    int64_t row = first;
    QJob job;
    if (first < jobs.total_rows && locate_row(jobs, row, job) && lane < nb)
      next_absmax = bnb4_block<8>(job.w + row * job.row_bytes, cols, job.dq, lane, 0, next);
  }
  await_inputs();
  extern __shared__ int4 act_shared[];
  __shared__ uint32_t tables_shared[kBnb4PermuteWords * 32];
  const int64_t chunks = cols / 16, slots = static_cast<int64_t>(act_shared_bytes(cols) / 16);
  {
    const int4* src = reinterpret_cast<const int4*>(q);
    for (int64_t i = threadIdx.x; i < NT * chunks; i += blockDim.x) {
      const int64_t tk = i / chunks, c = i % chunks;
      int4 v = src[tk * (nblk * 2) + c];
      v.x = static_cast<int>(__byte_perm(v.x, 0, 0x2301));
      v.y = static_cast<int>(__byte_perm(v.y, 0, 0x2301));
      v.z = static_cast<int>(__byte_perm(v.z, 0, 0x2301));
      v.w = static_cast<int>(__byte_perm(v.w, 0, 0x2301));
      act_shared[tk * slots + act_chunk_slot(static_cast<int>(c))] = v;
    }
    const uint32_t* permute = T == static_cast<int>(QuantType::NF4) ? c_nf4_permute : c_fp4_permute;
    for (int i = threadIdx.x; i < kBnb4PermuteWords * 32; i += blockDim.x) tables_shared[i] = permute[i / 32];
    __syncthreads();
  }
  Bnb4PermuteTables tables = lane_permute_tables(tables_shared, lane);
  bool preloaded = kPipelined;
  for (int64_t r = first; r < jobs.total_rows; r += warps) {
    int64_t row = r;
    QJob job;
    if (!locate_row(jobs, row, job)) break;
    const uint8_t* wr = job.w + row * job.row_bytes;
    float acc[NT] = {};
    if constexpr (kPipelined)
      if (!preloaded && lane < nb) next_absmax = bnb4_block<8>(wr, cols, job.dq, lane, 0, next);
    preloaded = false;
    for (int p = lane; p < nb; p += 32) {
      uint32_t w[8];
      float scale;
      if constexpr (kPipelined) {
#pragma unroll
        for (int k = 0; k < 8; ++k) w[k] = next[k];
        scale = next_absmax * (1.0f / 16384.0f);
        if (p + 32 < nb) next_absmax = bnb4_block<8>(wr, cols, job.dq, p + 32, 0, next);
      } else {
        scale = bnb4_block<8>(wr, cols, job.dq, p, 0, w) * (1.0f / 16384.0f);
      }
      const int* xs[NT];  // each token's 16 activation words of this block
#pragma unroll
      for (int k = 0; k < NT; ++k) xs[k] = reinterpret_cast<const int*>(act_shared + k * slots + act_chunk_slot(4 * p));
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // the block's two 32-blocks
        int lo_hi[NT] = {}, lo_lo[NT] = {}, hi_hi[NT] = {}, hi_lo[NT] = {};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int* x[NT];
#pragma unroll
          for (int k = 0; k < NT; ++k) x[k] = xs[k] + 8 * h + 2 * j;
          if (j < 2)
            bnb4_dot8_tokens<NT>(tables, w[4 * h + j], x, lo_hi, lo_lo);
          else
            bnb4_dot8_tokens<NT>(tables, w[4 * h + j], x, hi_hi, hi_lo);
        }
#pragma unroll
        for (int k = 0; k < NT; ++k) {
          const float dx = d[k * nblk + 2 * p + h];
          const int lo = tables.radix * lo_hi[k] + lo_lo[k], hi = tables.radix * hi_hi[k] + hi_lo[k];
          acc[k] += dx * (scale * static_cast<float>(lo) + scale * static_cast<float>(hi));  // no minimum
        }
      }
    }
    store_row_sums<NT>(acc, NT, job.rows, row, lane, job.y);
  }
}

// nf4 / fp4 passes of 2-16 tokens on the tensor cores, as q4k_mma_kernel: a block takes 16 rows, its 8
// warps split the row's 64-weight blocks (warp w: w, w + 8, ...). Each Q1.14 level is radix * hi + lo
// (bnb4_permute_tables.h): lane t looks up the byte planes of its 8 codes of a 32-weight half (code
// word t of the half) by the decode kernel's byte permutes, direct and flipped, and four chained mma
// give each plane's exact integer sums, S = radix * S_hi + S_lo, the dp4a kernel's block sums. The
// codes' nibbles are first swapped in pairs (bitsandbytes puts the lower element in the high nibble),
// so the permuted bytes follow the activations' order.
template <int T, int NTILE>
__global__ void __launch_bounds__(256) bnb4_mma_kernel(QJobs jobs, int64_t cols, const int8_t* q, const float* d,
                                                       int64_t nblk, int64_t n_tokens) {
  allow_dependents_in_last_wave();
  await_inputs();
  constexpr int kTokens = 8 * NTILE;
  __shared__ float partial[8][kMmaRows * kTokens];
  __shared__ uint32_t tables_shared[kBnb4PermuteWords * 32];  // a copy per lane (see bnb4_decode_kernel)
  {
    const uint32_t* permute = T == static_cast<int>(QuantType::NF4) ? c_nf4_permute : c_fp4_permute;
    for (int i = static_cast<int>(threadIdx.x); i < kBnb4PermuteWords * 32; i += static_cast<int>(blockDim.x))
      tables_shared[i] = permute[i / 32];
    __syncthreads();
  }
  const int warp = static_cast<int>(threadIdx.x / 32), lane = static_cast<int>(threadIdx.x % 32);
  const int g = lane / 4, t = lane % 4;
  const Bnb4PermuteTables tables = lane_permute_tables(tables_shared, lane);
  const int32_t radix = static_cast<int32_t>(tables_shared[32 * 8]);
  int64_t row0 = static_cast<int64_t>(blockIdx.x) * kMmaRows;
  QJob job;
  if (!locate_row(jobs, row0, job)) return;  // the whole block (every job's rows are a multiple of 16)
  const uint8_t* wg = job.w + (row0 + g) * job.row_bytes;  // rows g and g + 8 of the tile
  const uint8_t* wg8 = wg + 8 * job.row_bytes;
  const MmaTokens<NTILE> tok(g, t, n_tokens, q, d, nullptr, nblk);
  // The A registers of one byte plane for code words wa (row g) and wb (row g + 8), nibbles swapped.
  const auto plane = [](const uint32_t (&tab)[2], uint32_t wa, uint32_t wb, uint32_t (&a)[4]) {
    a[0] = byte_permute_signed(tab[0], tab[1], wa);        // row g, elements 8t..8t+3
    a[1] = byte_permute_signed(tab[0], tab[1], wb);        // row g + 8
    a[2] = byte_permute_signed(tab[0], tab[1], wa >> 16);  // row g, elements 8t+4..8t+7
    a[3] = byte_permute_signed(tab[0], tab[1], wb >> 16);
  };
  const auto swap_nibbles = [](uint32_t w) { return ((w >> 4) & 0x0F0F0F0Fu) | ((w & 0x0F0F0F0Fu) << 4); };
  float acc[NTILE][4] = {};
  const int blocks = static_cast<int>(cols / 64);
  // Code words t and 4 + t of block p (lane t's 8 codes of each 32-weight half) and its absmax, of both rows,
  // loaded an iteration ahead: H200, 8B nf4, same call, 2 / 4 / 8 / 16 sequences 482 / 902 / 1588 / 2074 tok/s
  // against 448 / 854 / 1551 / 2097 (64 registers, 72 before). The same in the q4_k and q6_k kernels lost
  // (q4_k 567 / 1069 / 1842 against 604 / 1107 / 1869; they hold far more bytes per lane).
  const auto load = [&](int p, uint32_t (&cg)[2], uint32_t (&cg8)[2], float& absmax_g, float& absmax_g8) {
    absmax_g = bnb4_block<1>(wg, cols, job.dq, p, 4 * t, &cg[0]);
    bnb4_block<1>(wg, cols, job.dq, p, 16 + 4 * t, &cg[1]);
    absmax_g8 = bnb4_block<1>(wg8, cols, job.dq, p, 4 * t, &cg8[0]);
    bnb4_block<1>(wg8, cols, job.dq, p, 16 + 4 * t, &cg8[1]);
  };
  uint32_t next_cg[2] = {0u, 0u}, next_cg8[2] = {0u, 0u};
  float next_absmax_g = 0.0f, next_absmax_g8 = 0.0f;
  if (warp < blocks) load(warp, next_cg, next_cg8, next_absmax_g, next_absmax_g8);
  for (int p = warp; p < blocks; p += 8) {
    const uint32_t cg[2] = {next_cg[0], next_cg[1]}, cg8[2] = {next_cg8[0], next_cg8[1]};  // loaded last iteration
    const float scale_g = next_absmax_g * (1.0f / 16384.0f), scale_g8 = next_absmax_g8 * (1.0f / 16384.0f);
    if (p + 8 < blocks) load(p + 8, next_cg, next_cg8, next_absmax_g, next_absmax_g8);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int b = 2 * p + h;  // the activations' 32-block
      const uint32_t wa = swap_nibbles(cg[h]), wb = swap_nibbles(cg8[h]);
      const uint32_t fa = wa ^ 0x88888888u, fb = wb ^ 0x88888888u;
      uint32_t hd[4], hf[4], ld[4], lf[4];
      plane(tables.hi_direct, wa, wb, hd);
      plane(tables.hi_flipped, fa, fb, hf);
      plane(tables.lo_direct, wa, wb, ld);
      plane(tables.lo_flipped, fa, fb, lf);
#pragma unroll
      for (int n = 0; n < NTILE; ++n) {
        const uint2 x = tok.x8(n, b, 8 * t);
        int direct_hi[4], s_hi[4], direct_lo[4], s_lo[4];
        mma_s8_m16n8k32(direct_hi, hd[0], hd[1], hd[2], hd[3], x.x, x.y, 0);
        mma_s8_m16n8k32(s_hi, hf[0], hf[1], hf[2], hf[3], x.x, x.y, direct_hi);
        mma_s8_m16n8k32(direct_lo, ld[0], ld[1], ld[2], ld[3], x.x, x.y, 0);
        mma_s8_m16n8k32(s_lo, lf[0], lf[1], lf[2], lf[3], x.x, x.y, direct_lo);
        const float dxa = tok.has_c0[n] ? tok.dx0[n][b] : 0.0f, dxb = tok.has_c1[n] ? tok.dx1[n][b] : 0.0f;
        acc[n][0] += dxa * scale_g * static_cast<float>(radix * s_hi[0] + s_lo[0]);
        acc[n][1] += dxb * scale_g * static_cast<float>(radix * s_hi[1] + s_lo[1]);
        acc[n][2] += dxa * scale_g8 * static_cast<float>(radix * s_hi[2] + s_lo[2]);
        acc[n][3] += dxb * scale_g8 * static_cast<float>(radix * s_hi[3] + s_lo[3]);
      }
    }
  }
  store_mma_partials<NTILE>(acc, partial, warp, g, t, n_tokens, job.y, job.rows, row0);
}

// 4 bytes at a 2-byte aligned address (q6_k blocks are 210 bytes): one word load where the caller knows it
// is 4-byte aligned, else two half-word loads.
template <bool kAligned>
__device__ __forceinline__ uint32_t word_b2(const uint8_t* p) {
  if constexpr (kAligned) return *reinterpret_cast<const uint32_t*>(p);
  const uint16_t* h = reinterpret_cast<const uint16_t*>(p);
  return static_cast<uint32_t>(h[0]) | (static_cast<uint32_t>(h[1]) << 16);
}

// int8 (bitsandbytes LLM.int8 rows: [f32 absmax][cols x int8], the int8 part 4-byte aligned) passes of 2-16
// tokens on the tensor cores, as q4k_mma_kernel: a block takes 16 rows, its 8 warps split the row's 32-weight
// blocks (warp w: w, w + 8, ...). The weights are the A operand as they are: lane t takes bytes 8t..8t+7 of a
// block (a0 / a1 the first four of rows g / g + 8, a2 / a3 the next four) against the same 8 activations; one
// mma gives the dp4a kernels' exact block sums for 8 tokens. The row scale absmax / 127 is applied at the end.
template <int NTILE>
__global__ void __launch_bounds__(256) int8_mma_kernel(QJobs jobs, int64_t cols, const int8_t* q, const float* d,
                                                       int64_t nblk, int64_t n_tokens) {
  BQ_MMA_TILE_PROLOGUE(NTILE);
  const MmaTokens<NTILE> tok(g, t, n_tokens, q, d, nullptr, nblk);
  const uint32_t* lg = reinterpret_cast<const uint32_t*>(wg + 4 + 8 * t);  // this lane's words of block 0
  const uint32_t* lg8 = reinterpret_cast<const uint32_t*>(wg8 + 4 + 8 * t);
  float acc[NTILE][4] = {};
  const int blocks = static_cast<int>(cols / 32);
  for (int b = warp; b < blocks; b += 8) {
    const uint32_t a0 = lg[8 * b], a2 = lg[8 * b + 1], a1 = lg8[8 * b], a3 = lg8[8 * b + 1];
#pragma unroll
    for (int n = 0; n < NTILE; ++n) {
      int c[4];
      const uint2 x = tok.x8(n, b, 8 * t);
      mma_s8_m16n8k32(c, a0, a1, a2, a3, x.x, x.y, kMagicInt);  // c[i] = kMagicInt + S (|S| <= 32 * 127 * 127 < 2^22)
      const float dxa = tok.has_c0[n] ? tok.dx0[n][b] : 0.0f, dxb = tok.has_c1[n] ? tok.dx1[n][b] : 0.0f;
      acc[n][0] += dxa * (__int_as_float(c[0]) - kMagicFloat);
      acc[n][1] += dxb * (__int_as_float(c[1]) - kMagicFloat);
      acc[n][2] += dxa * (__int_as_float(c[2]) - kMagicFloat);
      acc[n][3] += dxb * (__int_as_float(c[3]) - kMagicFloat);
    }
  }
  const float sg = f32_at(wg) / 127.0f, sg8 = f32_at(wg8) / 127.0f;
#pragma unroll
  for (int n = 0; n < NTILE; ++n) {
    acc[n][0] *= sg;
    acc[n][1] *= sg;
    acc[n][2] *= sg8;
    acc[n][3] *= sg8;
  }
  store_mma_partials<NTILE>(acc, partial, warp, g, t, n_tokens, job.y, job.rows, row0);
}

// Adds one 32-weight block's mma sums (c[i] = kMagicInt + S, |S| < 2^22) of tile n to acc, scaled by the
// tokens' scales (C's columns 2t and 2t + 1) and the block's scales in rows g (dg) and g + 8 (dg8).
template <int NTILE>
__device__ __forceinline__ void add_block_sums(float (&acc)[4], const int (&c)[4], const MmaTokens<NTILE>& tok, int n,
                                               int64_t b, float dg, float dg8) {
  const float dxa = tok.has_c0[n] ? tok.dx0[n][b] : 0.0f, dxb = tok.has_c1[n] ? tok.dx1[n][b] : 0.0f;
  acc[0] += dxa * dg * (__int_as_float(c[0]) - kMagicFloat);
  acc[1] += dxb * dg * (__int_as_float(c[1]) - kMagicFloat);
  acc[2] += dxa * dg8 * (__int_as_float(c[2]) - kMagicFloat);
  acc[3] += dxb * dg8 * (__int_as_float(c[3]) - kMagicFloat);
}

// q8_0 ([f16 d][32 x int8] blocks) passes of 2-16 tokens on the tensor cores, as int8_mma_kernel but a warp
// takes a pair of blocks at a time (warp w: pairs w, w + 8, ...). The 34-byte blocks are 2-byte aligned,
// and the same kernel with a block at a time lost to the dp4a kernel (4 sequences 506 against 683 tok/s,
// H200, 8B: half-word loads for every other block); a pair is 68 bytes, 4-byte aligned when the row is
// (rows of an even number of blocks): [d0][qs0][d1][qs1]. Lane t's bytes 8t..8t+7 of qs0 are bytes 2 + 8t..
// of the pair, two funnel shifts of three words; those of qs1 start at 36 + 8t, two words as they are.
template <int NTILE>
__global__ void __launch_bounds__(256) q80_mma_kernel(QJobs jobs, int64_t cols, const int8_t* q, const float* d,
                                                      int64_t nblk, int64_t n_tokens) {
  BQ_MMA_TILE_PROLOGUE(NTILE);
  const MmaTokens<NTILE> tok(g, t, n_tokens, q, d, nullptr, nblk);
  float acc[NTILE][4] = {};
  const int pairs = static_cast<int>(cols / 64);
  for (int p = warp; p < pairs; p += 8) {
    const uint32_t* w = reinterpret_cast<const uint32_t*>(wg + 68 * static_cast<int64_t>(p));  // row g's pair
    const uint32_t* w8 = reinterpret_cast<const uint32_t*>(wg8 + 68 * static_cast<int64_t>(p));
    const uint32_t g0 = w[2 * t], g1 = w[2 * t + 1], g2 = w[2 * t + 2];
    const uint32_t h0 = w8[2 * t], h1 = w8[2 * t + 1], h2 = w8[2 * t + 2];
    // [block]: the A registers (rows g, g + 8 first four bytes, then the next four) and the blocks' d
    const uint32_t a0[2] = {__funnelshift_r(g0, g1, 16), w[9 + 2 * t]}, a2[2] = {__funnelshift_r(g1, g2, 16), w[10 + 2 * t]};
    const uint32_t a1[2] = {__funnelshift_r(h0, h1, 16), w8[9 + 2 * t]}, a3[2] = {__funnelshift_r(h1, h2, 16), w8[10 + 2 * t]};
    const float dg[2] = {half_lo(w[0]), half_hi(w[8])}, dg8[2] = {half_lo(w8[0]), half_hi(w8[8])};
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int64_t b = 2 * static_cast<int64_t>(p) + k;
#pragma unroll
      for (int n = 0; n < NTILE; ++n) {
        int c[4];
        const uint2 x = tok.x8(n, b, 8 * t);
        mma_s8_m16n8k32(c, a0[k], a1[k], a2[k], a3[k], x.x, x.y, kMagicInt);
        add_block_sums(acc[n], c, tok, n, b, dg[k], dg8[k]);
      }
    }
  }
  store_mma_partials<NTILE>(acc, partial, warp, g, t, n_tokens, job.y, job.rows, row0);
}

// q4_0's signed levels (nibble - 8) of the four nibbles in the low half of each byte of u, as signed bytes:
// nibble + 0x78 stays within its byte, and flipping the top bit subtracts 0x80.
__device__ __forceinline__ uint32_t q40_levels(uint32_t u) { return ((u & 0x0F0F0F0Fu) + 0x78787878u) ^ 0x80808080u; }

// q4_0 ([f16 d][16 bytes: weight i in the low nibble of byte i, weight 16 + i in its high nibble]) passes of
// 2-16 tokens on the tensor cores, as q80_mma_kernel: a warp takes a pair of blocks at a time, 36 bytes,
// 4-byte aligned when the row is (rows of an even number of blocks): [d0][qs0][d1][qs1]. Lane t's word of a
// block's nibbles, bytes 4t..4t+3, holds weights 4t..4t+3 (low nibbles: A's k = 4t.., a0 / a1) and 16 + 4t..
// (high nibbles: k = 16 + 4t.., a2 / a3), which is the mma's own k order: the activations load as they are.
// That word of qs0 is bytes 2 + 4t.. of the pair (a funnel shift of two words), of qs1 bytes 20 + 4t.. (one word).
template <int NTILE>
__global__ void __launch_bounds__(256) q40_mma_kernel(QJobs jobs, int64_t cols, const int8_t* q, const float* d,
                                                      int64_t nblk, int64_t n_tokens) {
  BQ_MMA_TILE_PROLOGUE(NTILE);
  const MmaTokens<NTILE> tok(g, t, n_tokens, q, d, nullptr, nblk);
  float acc[NTILE][4] = {};
  const int pairs = static_cast<int>(cols / 64);
  for (int p = warp; p < pairs; p += 8) {
    const uint32_t* w = reinterpret_cast<const uint32_t*>(wg + 36 * static_cast<int64_t>(p));  // row g's pair
    const uint32_t* w8 = reinterpret_cast<const uint32_t*>(wg8 + 36 * static_cast<int64_t>(p));
    const uint32_t ng[2] = {__funnelshift_r(w[t], w[t + 1], 16), w[5 + t]};
    const uint32_t ng8[2] = {__funnelshift_r(w8[t], w8[t + 1], 16), w8[5 + t]};
    const float dg[2] = {half_lo(w[0]), half_hi(w[4])}, dg8[2] = {half_lo(w8[0]), half_hi(w8[4])};
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int64_t b = 2 * static_cast<int64_t>(p) + k;
      const uint32_t a0 = q40_levels(ng[k]), a2 = q40_levels(ng[k] >> 4);
      const uint32_t a1 = q40_levels(ng8[k]), a3 = q40_levels(ng8[k] >> 4);
#pragma unroll
      for (int n = 0; n < NTILE; ++n) {
        int c[4];
        mma_s8_m16n8k32(c, a0, a1, a2, a3, tok.x4(n, b, 4 * t), tok.x4(n, b, 16 + 4 * t), kMagicInt);
        add_block_sums(acc[n], c, tok, n, b, dg[k], dg8[k]);  // |S| <= 32 * 8 * 127
      }
    }
  }
  store_mma_partials<NTILE>(acc, partial, warp, g, t, n_tokens, job.y, job.rows, row0);
}

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

// One q6_k super-block's bytes that lane t of a q6k_mma_kernel tile needs from one row: words 4t of each
// 16-byte run of ql (8) and qh (4), all 16 scales, d. Blocks are 210 bytes, so a row's super-block is
// 4-byte aligned or 2 off (every other one when rows are a multiple of 4 bytes long, as in all the
// study's shapes: the same for all a warp's super-blocks, which are 8 apart): word loads, or half-word pairs.
struct Q6kLaneBytes {
  uint32_t ql[8], qh[4], sc[4];
  float d;
};
template <bool kAligned>
__device__ __forceinline__ void q6k_lane_bytes(const uint8_t* blk, int t, Q6kLaneBytes& o) {
#pragma unroll
  for (int i = 0; i < 8; ++i) o.ql[i] = word_b2<kAligned>(blk + 16 * i + 4 * t);
#pragma unroll
  for (int i = 0; i < 4; ++i) o.qh[i] = word_b2<kAligned>(blk + 128 + 16 * i + 4 * t);
#pragma unroll
  for (int i = 0; i < 4; ++i) o.sc[i] = word_b2<kAligned>(blk + 192 + 4 * i);
  o.d = half_at(blk + 208);
}
// Four weights' levels less 32, as signed bytes: the low nibbles of ql (shifted), bits 2k..2k+1 of qh
// above them (0..63 per byte); + 96 cannot carry out of a byte, and flipping the top bit subtracts 128.
__device__ __forceinline__ uint32_t q6k_levels(uint32_t ql, uint32_t qh, int ql_shift, int qh_shift) {
  const uint32_t q = ((ql >> ql_shift) & 0x0F0F0F0Fu) | (((qh >> qh_shift) & 0x03030303u) << 4);
  return (q + 0x60606060u) ^ 0x80808080u;
}

// q6_k passes of 2-16 tokens on the tensor cores (the output matrix of q4_k models, some down and value
// projections of q4_k_m), as q4k_mma_kernel: a block takes 16 rows, its 8 warps split the super-blocks.
// Each 16-weight sub-block has its own scale, so one int8 mma m16n8k16 per sub-block: the exact sums
// S = sum (q - 32) x of q6k_decode_kernel, combined per activation block as sc0 * S0 + sc1 * S1 (< 2^24,
// exact), then scaled by d and the activations' scale. Super-block layout (ggml): weight 128h + 32k + l
// (h < 2, k < 4, l < 32) has the low nibble of ql[64h + 32(k & 1) + l] (the high one for k >= 2), bits
// 2k, 2k + 1 of qh[32h + l], scale sc[8h + 2k + l / 16]. Lane t takes l = 16s + 4t..16s + 4t + 3 of
// sub-block s: word 4t of a 16-byte run of ql and of qh, against the same 4 activations.
template <int NTILE>
__global__ void __launch_bounds__(256) q6k_mma_kernel(QJobs jobs, int64_t cols, const int8_t* q, const float* d,
                                                      int64_t nblk, int64_t n_tokens) {
  BQ_MMA_TILE_PROLOGUE(NTILE);  // rows g and g + 8: the same alignment (8 rows of an even length apart)
  const MmaTokens<NTILE> tok(g, t, n_tokens, q, d, nullptr, nblk);
  float acc[NTILE][4] = {};
  const int superblocks = static_cast<int>(cols / 256);
  for (int sb = warp; sb < superblocks; sb += 8) {
    const uint8_t* bg = wg + 210 * static_cast<int64_t>(sb);
    const uint8_t* bg8 = wg8 + 210 * static_cast<int64_t>(sb);
    Q6kLaneBytes rg, rg8;
    if ((reinterpret_cast<uintptr_t>(bg) & 3) == 0) {
      q6k_lane_bytes<true>(bg, t, rg);
      q6k_lane_bytes<true>(bg8, t, rg8);
    } else {
      q6k_lane_bytes<false>(bg, t, rg);
      q6k_lane_bytes<false>(bg8, t, rg8);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int64_t b = 8 * static_cast<int64_t>(sb) + 4 * h + k;  // the activations' 32-block
        uint32_t ag[2], ag8[2];  // sub-blocks 0 and 1
        int scg[2], scg8[2];
#pragma unroll
        for (int sub = 0; sub < 2; ++sub) {
          const int j = 4 * h + 2 * (k & 1) + sub;  // ql's 16-byte run
          ag[sub] = q6k_levels(rg.ql[j], rg.qh[2 * h + sub], 4 * (k >> 1), 2 * k);
          ag8[sub] = q6k_levels(rg8.ql[j], rg8.qh[2 * h + sub], 4 * (k >> 1), 2 * k);
          const int byte = 8 * (2 * (k & 1) + sub);  // scale 8h + 2k + sub: word 2h + k / 2
          scg[sub] = static_cast<int8_t>(rg.sc[2 * h + (k >> 1)] >> byte);
          scg8[sub] = static_cast<int8_t>(rg8.sc[2 * h + (k >> 1)] >> byte);
        }
#pragma unroll
        for (int n = 0; n < NTILE; ++n) {
          int s0[4], s1[4];
          mma_s8_m16n8k16(s0, ag[0], ag8[0], tok.x4(n, b, 4 * t));
          mma_s8_m16n8k16(s1, ag[1], ag8[1], tok.x4(n, b, 16 + 4 * t));
          const float dxa = tok.has_c0[n] ? tok.dx0[n][b] : 0.0f, dxb = tok.has_c1[n] ? tok.dx1[n][b] : 0.0f;
          acc[n][0] += dxa * rg.d * static_cast<float>(scg[0] * s0[0] + scg[1] * s1[0]);
          acc[n][1] += dxb * rg.d * static_cast<float>(scg[0] * s0[1] + scg[1] * s1[1]);
          acc[n][2] += dxa * rg8.d * static_cast<float>(scg8[0] * s0[2] + scg8[1] * s1[2]);
          acc[n][3] += dxb * rg8.d * static_cast<float>(scg8[0] * s0[3] + scg8[1] * s1[3]);
        }
      }
    }
  }
  store_mma_partials<NTILE>(acc, partial, warp, g, t, n_tokens, job.y, job.rows, row0);
}

// q6_k one-token decode: a warp per row, a lane per half super-block (128 weights), in rounds of up
// to 16 super-blocks (32 halves, one per lane). The blocks are 210 bytes (2-byte aligned), so the
// generic kernel's lane per 32-weight block loaded ~80 scattered words per 128 weights (its ql bytes
// twice, its qh bytes four times): 2.36 TB/s on the 8B shape's output matrix. H200, tg128, same call:
// q4_k 501 -> 520 tok/s with this kernel, q4_k_m (some down projections q6_k) 454 -> 466. Here the warp
// first copies the round's bytes into shared memory with 16-byte copies (the first round before the
// dependent-launch wait: weights are never written), then each lane reads its half once. Rows are
// 2-byte aligned (unless their super-blocks are a multiple of 8), so the copies start at the 16-byte
// boundary below the row (up to 14 bytes of the row before, or none for the matrix's first row) and
// end at the one above the round (up to 15 bytes of the next row, or of the matrix's zeroed tail).
constexpr int kQ6kRoundBlocks = 16, kQ6kRoundBytes = 210 * kQ6kRoundBlocks, kQ6kStageBytes = kQ6kRoundBytes + 16;
constexpr int64_t kQ6kMaxCols = 32 * 1024;
__host__ __device__ constexpr size_t q6k_decode_smem(int64_t cols) { return act_shared_bytes(cols) + 8 * kQ6kStageBytes; }

// Round `round` of a row (super-blocks 16 * round on) into the warp's stage from the 16-byte boundary
// below it, as one async group; the round starts (row mod 16) bytes into the stage.
__device__ __forceinline__ void q6k_stage_round(const uint8_t* row, int blocks, int round, uint8_t* stage, int lane) {
  const int in_round = min(kQ6kRoundBlocks, blocks - kQ6kRoundBlocks * round);
  const uintptr_t start = reinterpret_cast<uintptr_t>(row + static_cast<int64_t>(round) * kQ6kRoundBytes);
  const uint8_t* src = reinterpret_cast<const uint8_t*>(start & ~uintptr_t{15});
  const int chunks = (static_cast<int>(start & 15) + 210 * in_round + 15) / 16;
  for (int c = lane; c < chunks; c += 32) cp_async16(stage + 16 * c, src + 16 * c);
  cp_async_commit();
}

__global__ void __launch_bounds__(256) q6k_decode_kernel(QJobs jobs, int64_t cols, const int8_t* q, const float* d,
                                                         const int* s) {
  allow_dependents_in_last_wave();
  extern __shared__ int4 act_shared[];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  uint8_t* stage = reinterpret_cast<uint8_t*>(act_shared) + act_shared_bytes(cols) + warp * kQ6kStageBytes;
  const int blocks = static_cast<int>(cols / 256);  // super-blocks per row
  const int rounds = (blocks + kQ6kRoundBlocks - 1) / kQ6kRoundBlocks;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  {
    int64_t row = first;
    QJob job;
    if (locate_row(jobs, row, job)) q6k_stage_round(job.w + row * job.row_bytes, blocks, 0, stage, lane);
  }
  await_inputs();
  {
    const int4* src = reinterpret_cast<const int4*>(q);
    for (int c = threadIdx.x; c < cols / 16; c += blockDim.x) act_shared[act_chunk_slot(c)] = src[c];
    __syncthreads();
  }
  const int sb = lane / 2, e = lane % 2;  // this lane's super-block in a round, and its half
  bool staged = true;
  for (int64_t r = first; r < jobs.total_rows; r += warps) {
    int64_t row = r;
    QJob job;
    if (!locate_row(jobs, row, job)) break;
    const uint8_t* wr = job.w + row * job.row_bytes;
    float acc = 0.0f;
    for (int round = 0; round < rounds; ++round) {
      if (!staged) q6k_stage_round(wr, blocks, round, stage, lane);
      staged = false;
      cp_async_wait_group<0>();
      __syncwarp();
      const bool mine = kQ6kRoundBlocks * round + sb < blocks;  // a last partial round leaves lanes idle
      const uint8_t* blk = stage + (reinterpret_cast<uintptr_t>(wr) & 15) + 210 * sb;  // rounds are 16-byte multiples
      uint32_t ql[16], qh[8], sc[2];
      float dd = 0.0f;
      if (mine) {
        load_words<16>(blk + 64 * e, ql);
        load_words<8>(blk + 128 + 32 * e, qh);
        load_words<2>(blk + 192 + 8 * e, sc);
        dd = half_at(blk + 208);
      }
      __syncwarp();  // the stage is read: the next round may overwrite it
      if (!mine) continue;
      const int half = 2 * (kQ6kRoundBlocks * round + sb) + e;  // this lane's 128 columns: activation blocks 4 * half + g
      float part = 0.0f;
#pragma unroll
      for (int g = 0; g < 4; ++g) {  // activation block g: elements 32g..32g+31 of the half
        const int4* ag = act_shared + act_chunk_slot(8 * half + 2 * g);
        const int4 x0 = ag[0], x1 = ag[1];
        const int x[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
        int lo = 0, hi = 0, xs_lo = 0;  // integer sums of the two 16-element sub-blocks, and the first's activations
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          // Elements l = 4k..4k+3 of group g: the low nibbles of ql[l] (g even) or ql[l + 32] (g odd),
          // the high ones for g >= 2; bits 2g, 2g+1 of qh[l] above them. Levels 0..63 (less 32 below).
          const uint32_t lw = g & 1 ? ql[k + 8] : ql[k];
          const uint32_t low = (g >= 2 ? lw >> 4 : lw) & 0x0F0F0F0Fu;
          const uint32_t high = ((qh[k] >> (2 * g)) & 0x03030303u) << 4;
          const int w = static_cast<int>(low | high);
          if (k < 4) {
            lo = __dp4a(w, x[k], lo);
            xs_lo = __dp4a(0x01010101, x[k], xs_lo);
          } else {
            hi = __dp4a(w, x[k], hi);
          }
        }
        const int b = 4 * half + g;
        const int xs_hi = s[b] - xs_lo;  // s: the activation block's sum
        const int sc_lo = static_cast<int8_t>(sc[g / 2] >> (16 * (g % 2)));
        const int sc_hi = static_cast<int8_t>(sc[g / 2] >> (16 * (g % 2) + 8));
        part += d[b] * static_cast<float>(sc_lo * (lo - 32 * xs_lo) + sc_hi * (hi - 32 * xs_hi));
      }
      acc += dd * part;
    }
    store_row_sums<1>(&acc, 1, job.rows, row, lane, job.y);
  }
}

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

// cuBLAS, opened at run time: the binary does not depend on a library of hundreds of MB that
// CPU-only machines (and CI) lack; without it (or with BIOQUANT_CUDA_GEMM=0) prompts run on the
// integer kernels.
class Cublas {
 public:
  void open(cudaStream_t stream) {
    if (const std::string knob = cuda_gemm_knob(); knob == "0" || knob == "mma") {
      status_ = "off (BIOQUANT_CUDA_GEMM=" + knob + ")";
      return;
    }
    for (const char* name : {"libcublas.so.13", "/usr/local/cuda/lib64/libcublas.so.13", "libcublas.so"}) {
      lib_ = dlopen(name, RTLD_NOW | RTLD_LOCAL);
      if (lib_ != nullptr) break;
    }
    if (lib_ == nullptr) {
      status_ = "off (libcublas.so.13 not found)";
      return;
    }
    auto create = reinterpret_cast<cublasStatus_t (*)(cublasHandle_t*)>(dlsym(lib_, "cublasCreate_v2"));
    auto set_stream = reinterpret_cast<cublasStatus_t (*)(cublasHandle_t, cudaStream_t)>(dlsym(lib_, "cublasSetStream_v2"));
    destroy_ = reinterpret_cast<cublasStatus_t (*)(cublasHandle_t)>(dlsym(lib_, "cublasDestroy_v2"));
    gemm_ = reinterpret_cast<decltype(gemm_)>(dlsym(lib_, "cublasGemmEx"));
    batched_ = reinterpret_cast<decltype(batched_)>(dlsym(lib_, "cublasGemmStridedBatchedEx"));
    if (create == nullptr || set_stream == nullptr || destroy_ == nullptr || gemm_ == nullptr ||
        create(&handle_) != CUBLAS_STATUS_SUCCESS || set_stream(handle_, stream) != CUBLAS_STATUS_SUCCESS) {
      status_ = "off (cuBLAS did not initialise)";
      close();
      return;
    }
    status_ = "cuBLAS bf16 GEMM (tensor cores)";
  }
  ~Cublas() { close(); }
  // Closes the handle (its device memory goes back); status says why.
  void release(const std::string& why) {
    close();
    status_ = why;
  }
  bool ready() const { return handle_ != nullptr; }
  bool batched_ready() const { return handle_ != nullptr && batched_ != nullptr; }
  // cuBLAS's own (column-major) terms: C = op(A) op(B), `batch` times with the given element strides;
  // bf16 A and B, f32 C.
  void gemm_batched(cublasOperation_t ta, cublasOperation_t tb, int64_t m, int64_t n, int64_t k, const __nv_bfloat16* a,
                    int64_t lda, int64_t stride_a, const __nv_bfloat16* b, int64_t ldb, int64_t stride_b, float* c, int64_t ldc,
                    int64_t stride_c, int64_t batch) const {
    const float one = 1.0f, zero = 0.0f;
    const cublasStatus_t st =
        batched_(handle_, ta, tb, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), &one, a, CUDA_R_16BF,
                 static_cast<int>(lda), stride_a, b, CUDA_R_16BF, static_cast<int>(ldb), stride_b, &zero, c, CUDA_R_32F,
                 static_cast<int>(ldc), stride_c, static_cast<int>(batch), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (st != CUBLAS_STATUS_SUCCESS) throw Error("cuBLAS batched GEMM failed (status " + std::to_string(static_cast<int>(st)) + ")");
  }
  const std::string& status() const { return status_; }
  // C [n][m] (row-major, ldc) = B [n][k] * A [m][k]^T, bf16 in, f32 out.
  void gemm(int64_t m, int64_t n, int64_t k, const __nv_bfloat16* a, const __nv_bfloat16* b, float* c, int64_t ldc) const {
    const float one = 1.0f, zero = 0.0f;
    const cublasStatus_t st = gemm_(handle_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(m), static_cast<int>(n),
                                    static_cast<int>(k), &one, a, CUDA_R_16BF, static_cast<int>(k), b, CUDA_R_16BF,
                                    static_cast<int>(k), &zero, c, CUDA_R_32F, static_cast<int>(ldc), CUBLAS_COMPUTE_32F,
                                    CUBLAS_GEMM_DEFAULT);
    if (st != CUBLAS_STATUS_SUCCESS) throw Error("cuBLAS GEMM failed (status " + std::to_string(static_cast<int>(st)) + ")");
  }

 private:
  void close() {
    if (handle_ != nullptr) destroy_(handle_);
    if (lib_ != nullptr) dlclose(lib_);
    handle_ = nullptr;
    lib_ = nullptr;
  }
  void* lib_ = nullptr;
  cublasHandle_t handle_ = nullptr;
  cublasStatus_t (*destroy_)(cublasHandle_t) = nullptr;
  cublasStatus_t (*gemm_)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const void*, const void*,
                          cudaDataType, int, const void*, cudaDataType, int, const void*, void*, cudaDataType, int,
                          cublasComputeType_t, cublasGemmAlgo_t) = nullptr;
  cublasStatus_t (*batched_)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const void*, const void*,
                             cudaDataType, int, long long, const void*, cudaDataType, int, long long, const void*, void*,
                             cudaDataType, int, long long, int, cublasComputeType_t, cublasGemmAlgo_t) = nullptr;
  std::string status_ = "off";
};

// ---------------------------------------------------------------------------------------------
// Elementwise kernels.

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
__device__ __forceinline__ float thread_sum_squares(const float* x, const float* add, int64_t n, float* v) {
#pragma unroll
  for (int k = 0; k < kNormCached; ++k) {
    const int64_t i = threadIdx.x + static_cast<int64_t>(k) * blockDim.x;
    v[k] = i < n ? (add != nullptr ? x[i] + add[i] : x[i]) : 0.0f;
  }
  float ss = 0.0f;
#pragma unroll
  for (int k = 0; k < kNormCached; ++k) ss += v[k] * v[k];  // columns past n add +0
  for (int64_t i = threadIdx.x + static_cast<int64_t>(kNormCached) * blockDim.x; i < n; i += blockDim.x) {
    const float u = add != nullptr ? x[i] + add[i] : x[i];
    ss += u * u;
  }
  return ss;
}

__global__ void rms_norm_kernel(const float* x, const float* w, float eps, int64_t n, float* out) {
  __shared__ float red[32];
  const float* xr = x + blockIdx.x * n;
  float* o = out + blockIdx.x * n;
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

constexpr int64_t kSlicedNormRows = kGpuSlicedNormRows;

// Fusion of the residual add, RMSNorm and the activation quantization of the matmuls that follow:
// x_out = x + add (when add is given); out = norm(x_out) * w (also in bf16 into out_bf16 when given, for
// tensor-core matmuls); (q, d, s) = out quantized per 32 (when q is given, for the integer kernels).
// Grid (tokens, column slices); 1024 threads per block; n a multiple of 32 (lanes of a warp hold 32
// consecutive columns, so a block's absmax is a warp reduction), slice a multiple of 32. Every block
// sums the squares of its whole row (in the same order whatever the slices, so results do not
// depend on them) and writes its slice: one token's norm then runs on n / slice SMs instead of as a
// chain of dependent steps on one. Blocks read x and add while others write, so with several
// slices x_out and out must alias neither (with one, x_out may be x).
__global__ void add_norm_quant_kernel(const float* x, const float* add, float* x_out, const float* w, float eps, int64_t n,
                                      int64_t slice, float* out, __nv_bfloat16* out_bf16, int8_t* q, float* d, int* s) {
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
  const float total = block_sum(thread_sum_squares(xr, ar, n, cached), red);
  const float scale = 1.0f / sqrtf(total / static_cast<float>(n) + eps);
  const int lane = threadIdx.x % 32;
  const int64_t end = min(n, (blockIdx.y + 1) * slice);
  for (int64_t i = blockIdx.y * slice + threadIdx.x; i - lane < end; i += blockDim.x) {  // warp-uniform bound
    float v = xr[i];
    if (ar != nullptr) {
      v += ar[i];
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

// RoPE (rotate-half over the first rotary_dim of each head) for q and k of every token, then K and V
// stored into the cache at their positions. Grid: tokens; threads over (head, i).
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
                                  int n_kv_heads, int head_dim, int rotary_dim, KV* k_cache, KV* v_cache, __half* k_scale,
                                  __half* v_scale, __nv_bfloat16* q_heads, int64_t n_tokens) {
  const int64_t t = blockIdx.x;
  const int64_t pos = *pos0_ptr + t;
  const int half = rotary_dim / 2;
  const int q_dim = n_heads * head_dim, kv_dim = n_kv_heads * head_dim;
  for (int j = threadIdx.x; j < (n_heads + n_kv_heads) * half; j += blockDim.x) {
    const int h = j / half, i = j % half;
    float* head = h < n_heads ? q + t * q_dim + h * head_dim : k + t * kv_dim + (h - n_heads) * head_dim;
    const float angle = static_cast<float>(pos) * inv_freq[i];
    float s, c;
    sincosf(angle, &s, &c);
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
      sincosf(static_cast<float>(pos) * inv_freq[j], &sn, &cs);
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
      float kv8[kChunks][8];
#pragma unroll
      for (int j = 0; j < kChunks; ++j)
        if (quarter + 4 * j < chunks) load8_kv(row, row_scale, 8 * (quarter + 4 * j), kv8[j]);
#pragma unroll
      for (int j = 0; j < kChunks; ++j) {
        if (quarter + 4 * j < chunks) {
#pragma unroll
          for (int e = 0; e < 8; ++e) acc += qr[j][e] * kv8[j][e];
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

// ---------------------------------------------------------------------------------------------
// Device memory, counted by purpose.

// Calls f(std::integral_constant<int, T>{}) for a quantized format T (the kernels' template
// argument); throws for formats without integer kernels (the plain ones).
template <class F>
void with_quantized_format(QuantType t, const char* what, F&& f) {
  switch (t) {
#define BQ_FORMAT(X) \
  case X: f(std::integral_constant<int, static_cast<int>(X)>{}); return
    BQ_FORMAT(QuantType::Q8_0);
    BQ_FORMAT(QuantType::Q4_0);
    BQ_FORMAT(QuantType::Q4_K);
    BQ_FORMAT(QuantType::Q5_K);
    BQ_FORMAT(QuantType::Q6_K);
    BQ_FORMAT(QuantType::INT8);
    BQ_FORMAT(QuantType::NF4);
    BQ_FORMAT(QuantType::FP4);
#undef BQ_FORMAT
    default: throw Error(std::string("CUDA: no ") + what + " for weights of type " + quant_traits(t).name);
  }
}

enum class Pool { Weights, Kv, Work };

// The driver hands device memory out in 2 MiB pages.
constexpr size_t kDevicePage = size_t{2} << 20;
inline size_t page_rounded(size_t n) { return (n + kDevicePage - 1) / kDevicePage * kDevicePage; }
inline std::string mib_text(size_t n) { return std::to_string((n + (size_t{1} << 19)) >> 20) + " MiB"; }

// Process-wide device memory limit (set_cuda_memory_limit; 0: the card's own).
size_t g_memory_limit = 0;

// Device total - free, as the driver counts it (the CUDA context and other processes included).
size_t device_used_now() {
  size_t free_b = 0, total_b = 0;
  if (cudaMemGetInfo(&free_b, &total_b) != cudaSuccess) return 0;
  return total_b - free_b;
}

struct Allocator {
  size_t bytes[3] = {0, 0, 0};
  size_t peak = 0;
  void* alloc(size_t n, Pool p) {
    void* ptr = nullptr;
    if (n == 0) return nullptr;
    if (const size_t limit = g_memory_limit; limit > 0) {
      const size_t used = device_used_now();
      if (used + page_rounded(n) > limit)
        throw Error("CUDA: allocating " + mib_text(n) + " would take the device to " + mib_text(used + n) +
                    ", over the memory limit of " + mib_text(limit) + " (--gpu-memory; " +
                    mib_text(bytes[0] + bytes[1] + bytes[2]) + " already held by this model)");
    }
    const cudaError_t e = cudaMalloc(&ptr, n);
    if (e != cudaSuccess) {
      cudaGetLastError();
      throw Error("CUDA: out of GPU memory allocating " + std::to_string(n >> 20) + " MiB (" +
                  std::to_string((bytes[0] + bytes[1] + bytes[2]) >> 20) + " MiB already held by this model)");
    }
    bytes[static_cast<int>(p)] += n;
    peak = std::max(peak, bytes[0] + bytes[1] + bytes[2]);
    return ptr;
  }
  void free(void* ptr, size_t n, Pool p) {
    if (ptr == nullptr) return;
    cudaFree(ptr);
    bytes[static_cast<int>(p)] -= n;
  }
};

struct DevBuf {
  void* ptr = nullptr;
  size_t n = 0;
  Pool pool = Pool::Work;
};

struct DevMatrix {
  QuantType type = QuantType::F32;
  int64_t rows = 0, cols = 0;
  size_t row_bytes = 0;
  bool dq = false;
  const uint8_t* data = nullptr;
};

struct DevLayer {
  DevMatrix wq, wk, wv, wo, w_gate, w_up, w_down;
  const float *bq = nullptr, *bk = nullptr, *bv = nullptr, *bo = nullptr, *b_gate = nullptr, *b_up = nullptr,
              *b_down = nullptr;
  const float *attn_norm = nullptr, *attn_post_norm = nullptr, *ffn_norm = nullptr, *ffn_post_norm = nullptr;
  const float *q_norm = nullptr, *k_norm = nullptr;
};

// Writes the rows of a synthetic matrix straight into device memory: a thread per row.
__global__ void random_rows_kernel(QuantType t, bool dq, int64_t cols, uint64_t seed, int64_t rows, size_t row_bytes,
                                   uint8_t* out) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r < rows) random_rows::make_row(t, dq, cols, seed, r, out + static_cast<size_t>(r) * row_bytes);
}

// ---------------------------------------------------------------------------------------------
// Exact numerics (kernels/exact.h): the CPU engine's exact steps (kernels/cpu/exact_ops.cpp), the
// same floats bit for bit. Speed is secondary: byte loads, one warp per output, no graphs.

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
__global__ void exact_rope_store_kernel(float* q, float* k, const float* v, const float* inv_freq, int64_t pos0, int n_heads,
                                        int n_kv_heads, int head_dim, int rotary_dim, float* k_cache, float* v_cache) {
  const int64_t t = blockIdx.x, pos = pos0 + t;
  const int half = rotary_dim / 2, kvd = n_kv_heads * head_dim;
  float* qt = q + t * n_heads * head_dim;
  float* kt = k + t * kvd;
  for (int j = threadIdx.x; j < (n_heads + n_kv_heads) * half; j += blockDim.x) {
    const int head = j / half, i = j % half;
    float* x = head < n_heads ? qt + head * head_dim : kt + (head - n_heads) * head_dim;
    float s, c;
    exact::sin_cos(exact::mul(exact::to_float(pos), inv_freq[i]), &s, &c);
    exact::rope_pair(x[i], x[i + half], c, s);
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

struct GpuDecoder::Impl {
  const Model& model;
  int device;
  KvType kv_type;
  bool exact;  // exact numerics (forward_exact)
  size_t exact_smem_limit = 0;  // exact_attention_kernel's score buffer, at most
  cudaStream_t stream = nullptr;
  Allocator mem;
  std::vector<DevBuf> owned;
  std::vector<DevLayer> layers;
  DevMatrix output;
  const float* final_norm = nullptr;
  const float* inv_freq = nullptr;
  std::map<const KVCache*, DevKv> caches;
  size_t device_used_peak = 0, device_total = 0, device_used_at_start = 0;
  size_t blas_bytes = 0;  // device memory cuBLAS's handle took when opened
  Cublas blas;
  // Prompt GEMM buffers (bf16 activations, one dequantized chunk of rows), grown on demand.
  DevBuf gemm_x, gemm_w[2];
  // Batched decode attention (one launch for up to kBatchAttentionSeqs sequences): per sequence its
  // heads' finished-split counters, split results and KV cache (its DevKv), grown as batches need.
  static constexpr int64_t kBatchAttentionSeqs = 64;
  bool batch_attention_on = cuda_knob_int("BIOQUANT_CUDA_ATTENTION_PER_SEQUENCE", 0) != 1;  // 1: a launch per sequence
  DevBuf batch_attn;
  std::vector<DevKv> host_refs;
  // Batched decode steps (every sequence one new token, the integer kernels) replay a graph too, once
  // the same caches have stepped together twice in a row: a batch whose sequences change every step
  // (continuous batching as sequences finish) would pay a capture each step. Its caches' K/V table is
  // copied in from pinned memory (graph_refs), refilled before each replay. BIOQUANT_CUDA_BATCH_GRAPH=2: none.
  bool batch_graphs_on = cuda_knob_int("BIOQUANT_CUDA_BATCH_GRAPH", 1) == 1;
  struct BatchGraph {
    cudaGraphExec_t exec = nullptr;
    std::vector<const KVCache*> caches;  // the step's sequences, in order
    uint64_t generation = 0;
    void* attn = nullptr;  // batch_attn's buffer when captured
  } batch_graph;
  std::vector<const KVCache*> last_batch;  // the previous batched decode step's caches
  DevKv* graph_refs = nullptr;              // pinned, kBatchAttentionSeqs entries
  bool capturing_batch = false;
  void drop_batch_graph() {
    if (batch_graph.exec) cudaGraphExecDestroy(batch_graph.exec);
    batch_graph = BatchGraph{};
  }
  struct BatchAttention {
    int* done = nullptr;
    float* part = nullptr;
    DevKv* refs = nullptr;  // null: each sequence its own launch
  };
  // Chunk c + 1 is dequantized on a side stream while chunk c multiplies (memory-bound work under
  // compute-bound work); events hand each buffer back and forth.
  cudaStream_t dequant_stream = nullptr;
  cudaEvent_t tile_ready[2] = {nullptr, nullptr}, tile_free[2] = {nullptr, nullptr};
  static constexpr int64_t kGemmMinTokens = kGpuGemmMinTokens;  // shorter sequences' rows: the integer kernels (exact, fast enough)
  // Rows [0, gemm_rows) of the step being enqueued multiply on tensor cores: those of the sequences
  // with at least kGemmMinTokens tokens in it (stacked first), so a sequence's arithmetic does not
  // depend on what it is batched with.
  int64_t gemm_rows = 0;
  // A decode step of at least this many sequences (one new token each) multiplies on tensor cores
  // through cuBLAS too: the dp4a kernels' cost grows with the rows (each extra token costs about half a
  // one-token matvec), the dequantize + GEMM's hardly does. Measured (H200, 8B shape, tokens/s of the
  // batch): q4_k 8 sequences 819 dp4a / 597 GEMM, 16: 811 / 980, 64: 803 / 2033; nf4 alike; bf16 8: 361 /
  // 1065. So 16 for quantized weights, 8 for plain ones; later, layers with mma kernels keep them longer
  // (mma_gemm_from). BIOQUANT_CUDA_BATCH_GEMM sets it.
  int64_t batch_gemm_min = cuda_knob_int("BIOQUANT_CUDA_BATCH_GEMM", 0);
  static bool mma_format(QuantType t) {
    return t == QuantType::Q4_K || t == QuantType::Q5_K || t == QuantType::Q6_K || t == QuantType::NF4 ||
           t == QuantType::FP4 || t == QuantType::INT8 || t == QuantType::Q8_0 || t == QuantType::Q4_0;
  }
  // The columns an mma kernel's rows must be a multiple of: whole super-blocks, nf4/fp4 blocks of 64, q8_0
  // and q4_0 block pairs, int8 blocks of 32.
  static int64_t mma_cols(QuantType t) {
    return t == QuantType::Q4_K || t == QuantType::Q5_K || t == QuantType::Q6_K ? 256 : t == QuantType::INT8 ? 32 : 64;
  }
  // The fewest tokens a pass takes the mma kernel with: q8_0's and q4_0's (block pairs, 16 rows a block) are
  // latency-bound with few tokens. H200, 8B, same call, mma / dp4a: q8_0 2 sequences 353 / 492 tok/s, 4: 665 /
  // 671, 8: 1154 / 841; q4_0 2: 431 / 600, 4: 790 / 821, 6: 1099 / 934, 8: 1354 / 1015.
  static int64_t mma_min_tokens(QuantType t) { return t == QuantType::Q8_0 ? 8 : t == QuantType::Q4_0 ? 6 : 2; }
  // From how many sequences a decode step of layers in this format is faster through cuBLAS than the mma
  // kernels (H200, 8B, mma / cuBLAS tok/s): q4_k 24 sequences 2051 / 1724, 32: 2201 / 2173, 48: 2166 / 2924;
  // nf4 24: 1898 / 1711, 32: 2089 / 2128; q4_k_m 24: 1977 / 1720, 32: 2110 / 2156; int8 24: 1855 / 1681, 32:
  // 2025 / 2106; q8_0 24: 1469 / 1615 (16: 1610 mma against 1132 cuBLAS); q4_0 24: 1648 / 1703, 32: 1828 /
  // 2197; q5_k 24: 2132 / 1702 (32: cuBLAS 2169).
  static int64_t mma_gemm_from(QuantType t) { return t == QuantType::Q8_0 || t == QuantType::Q4_0 ? 24 : 32; }
  // The smallest mma_gemm_from of the layers' formats, or 0 when a layer has no mma kernel.
  int64_t layers_mma_gemm_from() const {
    int64_t from = 1 << 30;
    for (const DevLayer& l : layers)
      for (const DevMatrix* m : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) {
        if (!mma_format(m->type)) return 0;
        from = std::min(from, mma_gemm_from(m->type));
      }
    return from;
  }
  bool batch_decode_gemm(std::span<const DecodeSegment> segments) const {
    // cuBLAS only: the WMMA fallback was slower than the integer kernels up to ~32 sequences (16: 423
    // against 811 tok/s, q4_k, H200).
    if (!blas.ready() || layers.empty()) return false;
    const QuantType t = layers.front().wq.type;
    const bool plain = t == QuantType::F32 || t == QuantType::F16 || t == QuantType::BF16;
    // Layers that multiply passes of up to 16 tokens on the tensor cores themselves (the mma kernels) keep
    // them longer (mma_gemm_from).
    const int64_t mma_from = batch_mma ? layers_mma_gemm_from() : 0;
    const int64_t fallback = plain ? 8 : mma_from > 0 ? mma_from : 16;
    if (static_cast<int64_t>(segments.size()) < (batch_gemm_min > 0 ? batch_gemm_min : fallback)) return false;
    for (const DecodeSegment& sg : segments)
      if (sg.n != 1) return false;
    return true;
  }
  // Decode (one token) kernel variant, BIOQUANT_CUDA_DECODE=1|2|3|4|5|6|8 to compare: 1 = one-token
  // kernel, 2 = that with its block loop unrolled twice, 3 = q4_k's pair kernel, 4 = BIOQUANT_CUDA_ROWS
  // rows per warp, 5 = the nf4/fp4 byte-permute kernel, 6 = that with each block's codes loaded an
  // iteration ahead, 8 = the 8-token prompt kernel; unset: the fastest measured per format (nf4/fp4: 6,
  // with double quantization 5).
  int decode_variant = cuda_knob_int("BIOQUANT_CUDA_DECODE", 0);
  bool group_launches = cuda_knob_int("BIOQUANT_CUDA_GROUP", 1) == 1;  // BIOQUANT_CUDA_GROUP=2: one launch per matrix
  // BIOQUANT_CUDA_PERSIST=k: decode grids of k blocks per SM whose warps loop over rows (0: a warp per row).
  unsigned persist_blocks = 0;
  // Rows per warp of the one-token kernels (BIOQUANT_CUDA_ROWS=1|2|4). Measured (8B shape, H100): q4_k
  // 1 (with its activations in shared memory: 307 tok/s against 288 for 2 rows from global memory);
  // the rows kernel of int8, q5_k, nf4, fp4: 2 (nf4 with dp2a: 260 tok/s, 1 row 265, 4 rows 209).
  int decode_rows = cuda_knob_int("BIOQUANT_CUDA_ROWS", 0);
  // Activations of the q4_k decode kernel through shared memory (BIOQUANT_CUDA_SHARED=2: from global).
  bool q4k_shared_activations = cuda_knob_int("BIOQUANT_CUDA_SHARED", 1) == 1;
  bool q6k_decode = cuda_knob_int("BIOQUANT_CUDA_Q6K", 1) == 1;  // 2: q6_k one-token rows on the generic kernel
  // q4_k, q5_k, q6_k, int8, q8_0, q4_0, nf4, fp4 and bf16 passes of 2-16 tokens on the tensor cores
  // (BIOQUANT_CUDA_BATCH_MMA=2: passes of 8 on qmatmul_kernel / bf16_matmul_vec_kernel).
  bool batch_mma = cuda_knob_int("BIOQUANT_CUDA_BATCH_MMA", 1) == 1;
  // q4_k, nf4 and fp4 passes of two tokens on q4k_decode_tokens_kernel / bnb4_decode_tokens_kernel
  // (BIOQUANT_CUDA_TWO_TOKENS=2: on the mma kernels; =3: nf4's and fp4's on the mma kernels, q4_k's not).
  int two_tokens_knob = cuda_knob_int("BIOQUANT_CUDA_TWO_TOKENS", 1);
  bool two_token_q4k = two_tokens_knob != 2, two_token_bnb4 = two_tokens_knob == 1;
  // Batched decode steps' kernels as dependent launches too, the mma kernels of the k-quants only
  // (BIOQUANT_CUDA_PDL_BATCH=2: none; 3: every mma kernel too); batch_step_pdl is set per step. H200, 8B,
  // same call, tok/s with / without: q4_k 2 sequences 710 / 657, 8: 1934 / 1888; bf16 16: 2400 / 2366;
  // q8_0 4: 718 / 676.
  int pdl_batch_knob = cuda_knob_int("BIOQUANT_CUDA_PDL_BATCH", 1);
  bool dependent_batch = pdl_batch_knob != 2, dependent_batch_mma = pdl_batch_knob == 3;
  bool batch_step_pdl = false;
  // Whether a decode kernel over n rows is launched dependent (see await_inputs): single tokens, and the
  // rows of a batched decode step (every sequence one token).
  bool pdl(int64_t n) const { return dependent_decode && (n == 1 || batch_step_pdl); }
  // Decode kernels as programmatic dependent launches (see await_inputs; BIOQUANT_CUDA_PDL=2: plain).
  bool dependent_decode = cuda_knob_int("BIOQUANT_CUDA_PDL", 1) == 1;
  // Decode attention in one kernel with RoPE, the cache store and the output quantization
  // (BIOQUANT_CUDA_FUSED=2: the separate kernels).
  bool fused_attention = cuda_knob_int("BIOQUANT_CUDA_FUSED", 1) == 1;
  // Prompt tokens of a sequence per step (see GpuDecoder::prompt_chunk).
  int64_t prompt_chunk = cuda_knob_int("BIOQUANT_CUDA_PROMPT_CHUNK", 0);
  // Splits of a decode attention head over blocks (BIOQUANT_CUDA_SPLITS=1: one block per head; unset:
  // about four blocks per SM, at most kGpuMaxAttentionSplits), each of at least BIOQUANT_CUDA_SPLIT_MIN positions.
  // Measured (8B q4_k, H100, tg at 4096 positions): 8 splits 288 tok/s, 16 305, 32 285.
  int attention_splits = std::min(cuda_knob_int("BIOQUANT_CUDA_SPLITS", 0), 64);
  int attention_min_chunk = cuda_knob_int("BIOQUANT_CUDA_SPLIT_MIN", 128);
  // Query heads per decode attention block (attention_decode_kernel; BIOQUANT_CUDA_ATTN_HEADS=1..4):
  // the heads of a KV group that share a block read its cache once.
  int attention_heads = std::clamp(cuda_knob_int("BIOQUANT_CUDA_ATTN_HEADS", kDecodeMaxHeads), 1, kDecodeMaxHeads);
  // Halved while the heads' scores for splits of split_len positions outgrow the shared memory.
  int decode_heads_per_block(int64_t split_len) const {
    const ModelConfig& c = model.config();
    int heads = static_cast<int>(std::min<int64_t>(attention_heads, c.n_heads / c.n_kv_heads));
    while (heads > 1 && decode_attention_smem(static_cast<int>(c.head_dim), split_len) * static_cast<size_t>(heads) > decode_smem_bytes)
      heads /= 2;
    return heads;
  }
  // Cached positions per decode attention block staged in shared memory (attention_decode_kernel):
  // the whole split when it fits beside the heads' scores, else as many as fit; BIOQUANT_CUDA_STAGE=n
  // stages at most n (1: none). A q8 cache needs head_dim and kv_dim multiples of 64 (its scales
  // copied in pairs).
  int attention_stage = cuda_knob_int("BIOQUANT_CUDA_STAGE", 0);
  int stage_len(int64_t split_len) const {
    const ModelConfig& c = model.config();
    if (attention_stage == 1) return 0;
    if (kv_type == KvType::Q8 && (c.head_dim % 64 != 0 || c.kv_dim() % 64 != 0)) return 0;
    const int d = static_cast<int>(c.head_dim);
    const size_t fixed = decode_attention_smem(d, split_len) * static_cast<size_t>(decode_heads_per_block(split_len));
    if (fixed >= decode_smem_bytes) return 0;
    // Rows of K and V (and, q8, their scales) that fit the room left, in multiples of 8; the q8 scales'
    // rounding to 16 bytes may take one step of 8 back.
    const size_t per_row = 2 * static_cast<size_t>(decode_stage_row(d, kv_bytes())) + (kv_type == KvType::Q8 ? 4 * static_cast<size_t>(d / 32) : 0);
    int64_t n = std::min<int64_t>((split_len + 7) / 8 * 8, static_cast<int64_t>((decode_smem_bytes - fixed) / per_row) / 8 * 8);
    if (attention_stage > 1) n = std::min<int64_t>(n, attention_stage / 8 * 8);
    while (n > 0 && fixed + decode_stage_bytes(d, kv_bytes(), static_cast<int>(n)) > decode_smem_bytes) n -= 8;
    return static_cast<int>(n);
  }
  int kv_bytes() const { return kv_type == KvType::F32 ? 4 : kv_type == KvType::BF16 ? 2 : 1; }
  // The fused decode attention's shared memory for splits of up to split_len positions.
  size_t decode_smem(int64_t split_len) const {
    const int d = static_cast<int>(model.config().head_dim);
    return decode_attention_smem(d, split_len) * static_cast<size_t>(decode_heads_per_block(split_len)) +
           decode_stage_bytes(d, kv_bytes(), stage_len(split_len));
  }
  // Decode steps take the fused attention kernel (attention_decode_kernel) when the head fits it.
  bool fused_decode_ok() const {
    const int64_t d = model.config().head_dim;
    return fused_attention && d % 32 == 0 && d <= kMaxHeadDim;
  }
  // Positions one block of the fused decode attention holds scores for, for contexts up to `len`: at
  // most the larger of the minimum split and an even share over the splits (the whole context with one).
  int64_t decode_split_len(int64_t len) const {
    if (attention_splits == 1) return len;
    return std::min<int64_t>(len, std::max<int64_t>(attention_min_chunk, (len + attention_splits - 1) / attention_splits));
  }
  // Whether a decode step over contexts up to `len` positions fits the attention kernels' shared memory.
  bool decode_attention_fits(int64_t len) const {
    if (fused_decode_ok()) return decode_smem(decode_split_len(len)) <= decode_smem_bytes;
    return attention_smem_bytes(len) <= attention_smem_limit;
  }
  // The attention kernels' dynamic shared memory on this card: what it has per block (H100: 227 KB, a
  // head's scores for ~50K positions beside the staged rows; A100: 163 KB, sm_86/89: 99 KB), at most
  // kAttentionSmemBytes for attention_kernel. Set by GpuDecoder::GpuDecoder.
  size_t decode_smem_bytes = 0, attention_smem_limit = 0;
  // Prompt attention on tensor cores with a bf16 cache (BIOQUANT_CUDA_TC_ATTENTION=2: the f32 tiled kernel).
  bool tensor_core_attention = cuda_knob_int("BIOQUANT_CUDA_TC_ATTENTION", 1) == 1;
  // Each of the two dequantized-row buffers (BIOQUANT_CUDA_TILE_MB to choose). Measured on an H100, 8B
  // q4_k pp512: 64 MB 18.5k tok/s, 48 MB 17.7k, 32 MB 14.1k (before the tensor-core attention); a 70B
  // model gets 32 MB (7% slower prompts than 48 MB) to keep its prompt workspace small.
  size_t gemm_tile_bytes = 0;

  // Workspace, grown on demand.
  struct Work {
    float *x = nullptr, *x2 = nullptr, *normed = nullptr, *h = nullptr, *q = nullptr, *k = nullptr, *v = nullptr, *attn = nullptr, *gate = nullptr,
          *up = nullptr, *logits = nullptr;
    int8_t* aq = nullptr;
    float* ad = nullptr;
    int* as = nullptr;
    int64_t* pos = nullptr;  // each sequence's first position (kernels read it, so a captured graph can replay)
    float* attn_part = nullptr;  // split decode attention: per head and split, the output, max and sum
    int* attn_done = nullptr;    // per head: its splits finished (zero between launches)
    float* host_x = nullptr;       // pinned: embedding rows in
    float* host_logits = nullptr;  // pinned: logits out
    int64_t* host_pos = nullptr;   // pinned
    int64_t tokens = 0, logit_rows = 0;
    uint64_t generation = 0;  // bumped when the buffers move (a captured graph then goes stale)
  } work;
  // Decode (one token, one logit row) replays a CUDA graph of the whole step: ~20 launches per layer
  // cost more than the step's kernels on small and mid-size models.
  struct Graph {
    cudaGraphExec_t exec = nullptr;
    const KVCache* cache = nullptr;
    uint64_t generation = 0;
  } graph;
  void drop_graph() {
    if (graph.exec) cudaGraphExecDestroy(graph.exec);
    graph = Graph{};
  }
  void free_pinned() {
    if (work.host_x) cudaFreeHost(work.host_x);
    if (work.host_logits) cudaFreeHost(work.host_logits);
    if (work.host_pos) cudaFreeHost(work.host_pos);
    work.host_x = work.host_logits = nullptr;
    work.host_pos = nullptr;
  }
  std::vector<DevBuf> work_bufs;
  uint8_t* arena = nullptr;
  size_t arena_size = 0, arena_used = 0;

  Impl(const Model& m, int dev, KvType kv, bool exact_numerics) : model(m), device(dev), kv_type(kv), exact(exact_numerics) {}

  ~Impl() {
    cudaSetDevice(device);
    drop_graph();
    drop_batch_graph();
    if (graph_refs) cudaFreeHost(graph_refs);
    free_pinned();
    for (auto& [cache, c] : caches) {
      const_cast<KVCache*>(cache)->on_release = nullptr;
      free_kv(c);
    }
    for (DevBuf& b : work_bufs) mem.free(b.ptr, b.n, b.pool);
    for (DevBuf& b : owned) mem.free(b.ptr, b.n, b.pool);
    mem.free(gemm_x.ptr, gemm_x.n, Pool::Work);
    mem.free(batch_attn.ptr, batch_attn.n, Pool::Work);
    mem.free(exact_act.ptr, exact_act.n, Pool::Work);
    for (int b = 0; b < 2; ++b) {
      mem.free(gemm_w[b].ptr, gemm_w[b].n, Pool::Work);
      if (tile_ready[b]) cudaEventDestroy(tile_ready[b]);
      if (tile_free[b]) cudaEventDestroy(tile_free[b]);
    }
    if (dequant_stream) cudaStreamDestroy(dequant_stream);
    if (stream) cudaStreamDestroy(stream);
  }

  // Launches a kernel of the forward pass on `stream` (argument types converted to the kernel's).
  // dependent: a programmatic dependent launch (see await_inputs), for decode steps.
  template <class... Params, class... Args>
  void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Args&&... args) {
    launch_with(false, kernel, grid, block, smem, std::forward<Args>(args)...);
  }
  template <class... Params, class... Args>
  void launch_with(bool dependent, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Args&&... args) {
    cudaLaunchConfig_t config{};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    cudaLaunchAttribute attr{};
    if (dependent) {
      attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attr.val.programmaticStreamSerializationAllowed = 1;
      config.attrs = &attr;
      config.numAttrs = 1;
    }
    CUDA_OK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
  }

  // Weights live in one allocation (reserve_weights): cudaMalloc rounds each large allocation up to
  // 2 MiB, which over the ~600 matrices of a 70B model held ~0.5 GiB that no tensor used.
  static size_t arena_bytes(size_t n) { return (n + 255) / 256 * 256; }
  void reserve_weights(size_t n) {
    arena = static_cast<uint8_t*>(mem.alloc(n, Pool::Weights));
    owned.push_back({arena, n, Pool::Weights});
    arena_size = n;
  }
  void* weight_alloc(size_t n) {
    if (arena != nullptr && arena_used + arena_bytes(n) <= arena_size) {
      void* p = arena + arena_used;
      arena_used += arena_bytes(n);
      return p;
    }
    void* p = mem.alloc(n, Pool::Weights);
    owned.push_back({p, n, Pool::Weights});
    return p;
  }
  const float* upload_vec(const std::vector<float>& v) {
    if (v.empty()) return nullptr;
    void* ptr = weight_alloc(v.size() * sizeof(float));
    CUDA_OK(cudaMemcpy(ptr, v.data(), v.size() * sizeof(float), cudaMemcpyHostToDevice));
    return static_cast<const float*>(ptr);
  }
  DevMatrix upload_matrix(const Matrix& m) {
    check(!(m.type == QuantType::INT8 && m.outlier_threshold > 0.0f),
          "the CUDA backend has no LLM.int8 outlier path: leave --int8-threshold at 0 with --device cuda");
    DevMatrix d{m.type, m.rows, m.cols, m.row_bytes(), m.double_quant, nullptr};
    // A zeroed tail: the block decoders' word loads (load_words) may read 3 bytes past the last block.
    uint8_t* ptr = static_cast<uint8_t*>(weight_alloc(m.nbytes() + kMatrixTail));
    CUDA_OK(cudaMemsetAsync(ptr + m.nbytes(), 0, kMatrixTail, stream));
    d.data = ptr;
    if (m.data != nullptr) {
      CUDA_OK(cudaMemcpy(ptr, m.data, m.nbytes(), cudaMemcpyHostToDevice));
      return d;
    }
    check(m.random_seed != 0, "matrix without data");
    random_rows_kernel<<<static_cast<unsigned>((m.rows + 127) / 128), 128, 0, stream>>>(m.type, m.double_quant, m.cols,
                                                                                       m.random_seed, m.rows, d.row_bytes, ptr);
    CUDA_OK(cudaGetLastError());
    return d;
  }
  void free_kv(DevKv& c) {
    mem.free(c.k, c.values_bytes, Pool::Kv);
    mem.free(c.v, c.values_bytes, Pool::Kv);
    mem.free(c.k_scale, c.scale_bytes, Pool::Kv);
    mem.free(c.v_scale, c.scale_bytes, Pool::Kv);
  }

  void sample_device_memory() {
    size_t free_b = 0, total_b = 0;
    if (cudaMemGetInfo(&free_b, &total_b) == cudaSuccess) {
      device_total = total_b;
      device_used_peak = std::max(device_used_peak, total_b - free_b);
    }
  }

  size_t work_bytes(int64_t tokens, int64_t logit_rows) const {
    return gpu_work_sizes(model.config(), tokens, logit_rows, attention_splits).bytes();
  }
  void ensure_work(int64_t tokens, int64_t logit_rows) {
    if (tokens <= work.tokens && logit_rows <= work.logit_rows) return;
    drop_graph();
    for (DevBuf& b : work_bufs) mem.free(b.ptr, b.n, b.pool);
    work_bufs.clear();
    free_pinned();
    const ModelConfig& c = model.config();
    tokens = std::max(tokens, work.tokens);
    logit_rows = std::max(logit_rows, work.logit_rows);
    // The buffers gpu_work_sizes lays out (work_bytes adds the same sizes up).
    const auto fbuf = [&](int64_t floats) {
      const size_t bytes = static_cast<size_t>(floats) * sizeof(float);
      void* p = mem.alloc(bytes, Pool::Work);
      work_bufs.push_back({p, bytes, Pool::Work});
      return static_cast<float*>(p);
    };
    const GpuWorkSizes n = gpu_work_sizes(c, tokens, logit_rows, attention_splits);
    work.x = fbuf(n.x);
    work.x2 = fbuf(n.x2);
    work.h = fbuf(n.h);
    work.q = fbuf(n.q);
    work.k = fbuf(n.k);
    work.v = fbuf(n.v);
    work.attn = fbuf(n.attn);
    work.normed = n.normed == 0 ? work.attn : fbuf(n.normed);
    work.gate = fbuf(n.gate);
    work.up = fbuf(n.up);
    work.logits = fbuf(n.logits);
    work.aq = reinterpret_cast<int8_t*>(fbuf(n.aq));
    work.ad = fbuf(n.ad);
    work.as = reinterpret_cast<int*>(fbuf(n.as));
    work.pos = reinterpret_cast<int64_t*>(fbuf(n.pos));
    work.attn_part = fbuf(n.attn_part);
    work.attn_done = reinterpret_cast<int*>(fbuf(n.attn_done));
    CUDA_OK(cudaMemsetAsync(work.attn_done, 0, static_cast<size_t>(c.n_heads) * sizeof(int), stream));
    CUDA_OK(cudaMallocHost(&work.host_x, static_cast<size_t>(tokens * c.hidden) * sizeof(float)));
    CUDA_OK(cudaMallocHost(&work.host_logits, static_cast<size_t>(logit_rows * c.vocab) * sizeof(float)));
    CUDA_OK(cudaMallocHost(&work.host_pos, static_cast<size_t>(tokens) * sizeof(int64_t)));
    ++work.generation;
    work.tokens = tokens;
    work.logit_rows = logit_rows;
  }

  // Bytes of the K (and of the V) values and of their q8 scales for a cache of `capacity` positions.
  void kv_sizes(int64_t capacity, size_t& values_bytes, size_t& scale_bytes) const {
    gpu_kv_sizes(model.config(), capacity, kv_type, values_bytes, scale_bytes);
  }

  // Under a memory limit (g_memory_limit), the most prompt tokens per sequence a step of these segments
  // can take (0: all of them) so that the KV caches it allocates, its workspace and its tensor-core
  // buffers fit in what the limit leaves: the tensor-core path (and cuBLAS, whose handle holds
  // ~70 MiB) is given up when only the integer kernels' smaller workspace fits. Throws when not
  // even one token per sequence fits.
  int64_t fit_prompt_chunk(std::span<const DecodeSegment> segments) {
    if (prompt_chunk > 0) return prompt_chunk;
    const size_t limit = g_memory_limit;
    if (limit == 0 || segments.empty()) return 0;
    const ModelConfig& c = model.config();
    size_t pending_kv = 0;
    std::vector<const KVCache*> seen;
    int64_t longest = 0, logit_rows = 0;
    for (const DecodeSegment& sg : segments) {
      longest = std::max(longest, sg.n);
      logit_rows += sg.n_logits;
      if (caches.count(sg.cache) == 0 && std::find(seen.begin(), seen.end(), sg.cache) == seen.end()) {
        seen.push_back(sg.cache);
        size_t values = 0, scales = 0;
        kv_sizes(sg.cache->capacity(), values, scales);
        pending_kv += 2 * (page_rounded(values) + page_rounded(scales));
      }
    }
    logit_rows = std::max<int64_t>(logit_rows, 1);
    size_t held_work = 0;
    for (const DevBuf& b : work_bufs) held_work += b.n;
    const size_t held_gemm = gemm_x.n + gemm_w[0].n + gemm_w[1].n;
    const size_t used = device_used_now();
    const size_t margin = size_t{16} << 20;  // graph instantiation, page rounding
    const int64_t widest = std::max({c.hidden, c.q_dim(), c.intermediate});
    const size_t tiles = 2 * std::max(gemm_tile_bytes, static_cast<size_t>(128 * widest * 2));
    // What a step with rows of at most `chunk` tokens per sequence adds to the device's use, prompt rows
    // on cuBLAS (tiles and bf16 activations), on dequant_mma_kernel (bf16 activations) or on the
    // integer kernels.
    enum Mode { kCublas, kMma, kInteger };
    const auto extra = [&](int64_t chunk, Mode mode) {
      int64_t rows = 0, gemm_rows_needed = 0;
      for (const DecodeSegment& sg : segments) {
        const int64_t r = std::min(sg.n, chunk);
        rows += r;
        if (mode != kInteger && r >= kGemmMinTokens) gemm_rows_needed += r;
      }
      if (mode != kInteger && batch_decode_gemm(segments)) gemm_rows_needed = rows;
      size_t add = pending_kv;
      if (rows > work.tokens || logit_rows > work.logit_rows) {
        const size_t want = work_bytes(std::max(rows, work.tokens), std::max(logit_rows, work.logit_rows));
        add += want > held_work ? want - held_work : 0;
      }
      if (gemm_rows_needed > 0) {
        const size_t want = (mode == kCublas ? page_rounded(tiles) : 0) +
                            page_rounded(static_cast<size_t>(gemm_rows_needed * widest * 2));
        add += want > held_gemm ? want - held_gemm : 0;
      }
      return add;
    };
    // The largest chunk in [1, longest] whose step fits in `room` (0: none).
    const auto largest = [&](size_t room, Mode mode) {
      int64_t lo = 0, hi = longest;
      while (lo < hi) {
        const int64_t mid = lo + (hi - lo + 1) / 2;
        if (extra(mid, mode) <= room) lo = mid; else hi = mid - 1;
      }
      return lo;
    };
    const Mode without_cublas = mma_fallback ? kMma : kInteger;
    const size_t room = limit > used + margin ? limit - used - margin : 0;
    int64_t chunk = largest(room, blas.ready() ? kCublas : without_cublas);
    if (blas.ready() && chunk < std::min(longest, kGemmMinTokens)) {
      // Without cuBLAS: its handle and buffers freed (tiles no longer needed).
      const int64_t integer_chunk = largest(room + blas_bytes + held_gemm, without_cublas);
      if (integer_chunk > chunk) {
        blas.release("off (no room under the --gpu-memory limit)");
        for (DevBuf* b : {&gemm_x, &gemm_w[0], &gemm_w[1]}) {
          mem.free(b->ptr, b->n, Pool::Work);
          *b = DevBuf{};
        }
        chunk = integer_chunk;
      }
    }
    if (chunk == 0)
      throw Error("CUDA: the memory limit of " + mib_text(limit) + " (--gpu-memory) leaves " + mib_text(room) +
                  "; this step needs " + mib_text(extra(1, kInteger)) + " for one token per sequence (KV cache " +
                  mib_text(pending_kv) + ")");
    return chunk >= longest ? 0 : chunk;
  }

  DevKv& kv_for(const KVCache& cache) {
    auto it = caches.find(&cache);
    if (it != caches.end()) {
      check(it->second.capacity == cache.capacity(), "KV cache capacity changed");
      return it->second;
    }
    DevKv kv;
    kv_sizes(cache.capacity(), kv.values_bytes, kv.scale_bytes);
    kv.k = mem.alloc(kv.values_bytes, Pool::Kv);
    kv.v = mem.alloc(kv.values_bytes, Pool::Kv);
    kv.k_scale = static_cast<__half*>(mem.alloc(kv.scale_bytes, Pool::Kv));
    kv.v_scale = static_cast<__half*>(mem.alloc(kv.scale_bytes, Pool::Kv));
    kv.capacity = cache.capacity();
    const_cast<KVCache&>(cache).on_release = [this](const KVCache& gone) { release(gone); };
    return caches.emplace(&cache, kv).first->second;
  }

  void* grow(DevBuf& b, size_t bytes) {
    if (b.n < bytes) {
      mem.free(b.ptr, b.n, Pool::Work);
      b = DevBuf{mem.alloc(bytes, Pool::Work), bytes, Pool::Work};
    }
    return b.ptr;
  }

  // Prompt matmul on tensor cores (see dequant_bf16_kernel); xb: x [n, m.cols] in bf16.
  void gemm(const __nv_bfloat16* xb, int64_t n, const DevMatrix& m, float* y) {
    if (!blas.ready()) {  // tensor cores without cuBLAS (see tensor_cores)
      const dim3 grid(static_cast<unsigned>((m.rows + 63) / 64), static_cast<unsigned>((n + 127) / 128));
      with_quantized_format(m.type, "tensor-core kernel", [&](auto format) {
        launch(dequant_mma_kernel<decltype(format)::value>, grid, 128, 0, m.data, m.row_bytes, m.rows, m.cols, m.dq, xb, n,
               y, m.rows);
      });
      return;
    }
    if (m.type == QuantType::BF16) {
      blas.gemm(m.rows, n, m.cols, reinterpret_cast<const __nv_bfloat16*>(m.data), xb, y, m.rows);
      return;
    }
    const int64_t chunk = gpu_gemm_tile_rows(m.rows, m.cols, gemm_tile_bytes);
    __nv_bfloat16* tiles[2] = {nullptr, nullptr};
    for (int b = 0; b < (chunk < m.rows ? 2 : 1); ++b)
      tiles[b] = static_cast<__nv_bfloat16*>(grow(gemm_w[b], static_cast<size_t>(chunk * m.cols) * 2));
    for (int64_t r0 = 0, c = 0; r0 < m.rows; r0 += chunk, ++c) {
      const int b = static_cast<int>(c % 2);
      __nv_bfloat16* wb = tiles[b];
      const int64_t cnt = std::min(chunk, m.rows - r0);
      const unsigned grid = blocks_for(cnt * (m.cols / 32));
      const uint8_t* w = m.data + static_cast<size_t>(r0) * m.row_bytes;
      CUDA_OK(cudaStreamWaitEvent(dequant_stream, tile_free[b], 0));
      with_quantized_format(m.type, "dequantizer", [&](auto format) {
        dequant_bf16_kernel<decltype(format)::value><<<grid, 256, 0, dequant_stream>>>(w, m.row_bytes, cnt, m.cols, m.dq, wb);
      });
      CUDA_OK(cudaEventRecord(tile_ready[b], dequant_stream));
      CUDA_OK(cudaStreamWaitEvent(stream, tile_ready[b], 0));
      blas.gemm(cnt, n, m.cols, wb, xb, y + r0, m.rows);
      CUDA_OK(cudaEventRecord(tile_free[b], stream));
    }
  }

  struct Job {
    const DevMatrix* m;
    float* y;
  };
  // y [n, m.rows] = x [n, m.cols] * m^T
  void matmul(const float* x, int64_t n, const DevMatrix& m, float* y, bool prequantized = false,
              const __nv_bfloat16* x_bf16 = nullptr) {
    const Job j{&m, y};
    matmuls(x, n, &j, 1, prequantized, x_bf16);
  }
  // Several matrices of the same input: its activations are quantized once, and consecutive
  // matrices of one format go in one launch.
  // The matrices of these jobs all take the integer kernels for a batch of n tokens (so their
  // activations can be quantized by a fused kernel before matmuls(..., prequantized = true)).
  bool integer_path(int64_t n, std::initializer_list<const DevMatrix*> ms) const {
    for (const DevMatrix* m : ms) {
      const bool plain = m->type == QuantType::F32 || m->type == QuantType::F16 || m->type == QuantType::BF16;
      if (plain || (gemm_capable(*m) && gemm_rows >= n)) return false;
    }
    return true;
  }

  bool gemm_capable(const DevMatrix& m) const {
    if (m.cols % 32 != 0 || m.type == QuantType::F32 || m.type == QuantType::F16) return false;
    return blas.ready() || (tensor_cores() && m.type != QuantType::BF16);  // dequant_mma_kernel: quantized only
  }
  // Prompt rows multiply on tensor cores: through cuBLAS, or, without it (a memory limit gave it up, or
  // libcublas.so.13 is absent), through dequant_mma_kernel. BIOQUANT_CUDA_GEMM=0: neither.
  bool tensor_cores() const { return blas.ready() || mma_fallback; }
  bool mma_fallback = cuda_gemm_knob() != "0";

  // Rows [0, gemm_rows) on tensor cores, the others on the integer (or plain) kernels. With
  // prequantized, the activations of all n rows are already in work.aq/ad/as.
  // x_bf16: x already in bf16 (its first gemm_rows rows at least), else converted here when needed.
  void matmuls(const float* x, int64_t n, const Job* all, int n_all, bool prequantized = false,
               const __nv_bfloat16* x_bf16 = nullptr) {
    constexpr int kThreads = 256, kRowsPerBlock = kThreads / 32;
    Job jobs[3];
    int count = 0;
    int64_t r0 = 0;  // first row left to the integer kernels (one value for all of them: same capability)
    const __nv_bfloat16* xb = x_bf16;
    for (int i = 0; i < n_all; ++i) {
      const DevMatrix& m = *all[i].m;
      const bool plain = m.type == QuantType::F32 || m.type == QuantType::F16 || m.type == QuantType::BF16;
      const int64_t g = gemm_capable(m) ? std::min(gemm_rows, n) : 0;
      if (g > 0) {
        // The matrices of a group share their input: converted to bf16 once.
        if (xb == nullptr) {
          auto* converted = static_cast<__nv_bfloat16*>(grow(gemm_x, static_cast<size_t>(g * m.cols) * 2));
          launch(to_bf16_kernel, blocks_for(g * m.cols), 256, 0, x, g * m.cols, converted);
          xb = converted;
        }
        gemm(xb, g, m, all[i].y);
      }
      if (g == n) continue;
      if (plain) {
        plain_matmul(x + g * m.cols, n - g, m, all[i].y + g * m.rows);
      } else {
        check(count < 3 && (count == 0 || g == r0), "CUDA: inconsistent matmul group");
        r0 = g;
        jobs[count++] = Job{all[i].m, all[i].y + g * m.rows};
      }
    }
    if (count == 0) return;
    const int64_t cols = jobs[0].m->cols;
    const int64_t nblk = (cols + 31) / 32;
    int64_t act_row0 = r0;  // the first integer row's place in work.aq/ad/as
    x += r0 * cols;
    n -= r0;
    if (!prequantized) {
      const int64_t warps = n * nblk;
      launch(quantize_act_kernel, static_cast<unsigned>((warps * 32 + 255) / 256), 256, 0, x, cols, nblk, n, work.aq,
                                                                                             work.ad, work.as);
      act_row0 = 0;
    }
    for (int first = 0; first < count;) {
      QJobs group{};
      int64_t total_rows = 0;
      const QuantType type = jobs[first].m->type;
      int last = first;
      while (last < count && last - first < (group_launches ? 3 : 1) && jobs[last].m->type == type) {
        const DevMatrix& m = *jobs[last].m;
        check(m.cols == cols, "CUDA: matmul group with different widths");
        group.job[group.count++] = QJob{m.data, m.row_bytes, m.rows, m.dq, nullptr};
        total_rows += m.rows;
        ++last;
      }
      group.total_rows = total_rows;
      // The mma kernels of a batched decode step: dependent for the k-quants only. H200, 8B, same call, 8 / 16
      // sequences, dependent / not: q4_k 1934 / 1847, 2263 / 2185 tok/s; q4_k_m 8: 1838 / 1790; nf4 1410 /
      // 1583, 1984 / 2090; q8_0 1044 / 1198, 1335 / 1705; int8 1512 / 1581, 2127 / 2100 (the other kernels
      // of the step dependent in both).
      const bool kquant = type == QuantType::Q4_K || type == QuantType::Q5_K || type == QuantType::Q6_K;
      const bool dependent = pdl(n), mma_dependent = dependent && (dependent_batch_mma || kquant);
      const unsigned grid = static_cast<unsigned>((total_rows + kRowsPerBlock - 1) / kRowsPerBlock);
      // Passes of up to 16 tokens on the tensor cores (q4k_mma_kernel for q4_k and q5_k, q6k_mma_kernel,
      // int8_mma_kernel, q80_mma_kernel, q40_mma_kernel, bnb4_mma_kernel); of up to 8 on qmatmul_kernel otherwise.
      // q4_k, nf4 and fp4 passes of 2 tokens: q4k_decode_tokens_kernel, bnb4_decode_tokens_kernel.
      const bool two_token_format = type == QuantType::Q4_K ? two_token_q4k
                                    : type == QuantType::NF4 || type == QuantType::FP4 ? two_token_bnb4
                                                                                       : false;
      const bool two_tokens = n == 2 && two_token_format && decode_variant == 0 && cols % 128 == 0 &&
                              cols <= kTwoTokensMaxCols;
      const bool mma_pass = !two_tokens && batch_mma && n >= mma_min_tokens(type) && mma_format(type) &&
                            cols % mma_cols(type) == 0 && rows_multiple_of(group, kMmaRows);
      const int64_t pass_tokens = two_tokens ? n : mma_pass ? 2 * kMmaTileTokens : 8;
      for (int64_t t0 = 0; t0 < n; t0 += pass_tokens) {
        const int64_t nt = std::min<int64_t>(pass_tokens, n - t0);
        for (int i = 0; i < group.count; ++i) group.job[i].y = jobs[first + i].y + t0 * jobs[first + i].m->rows;
        const int8_t* q = work.aq + (act_row0 + t0) * nblk * 32;
        const float* d = work.ad + (act_row0 + t0) * nblk;
        const int* s = work.as + (act_row0 + t0) * nblk;
        // Measured (8B shape, H100): q4_k's pair kernel; int8, q5_k, nf4, fp4 the kernel of two rows
        // per warp; q8_0, q4_0 (word loads + dp4a) the one-token kernel with its loop unrolled twice; q6_k
        // (whole super-blocks) its own kernel (H200), else that one.
        const bool rows_kernel = type == QuantType::INT8 || type == QuantType::Q5_K || type == QuantType::NF4 ||
                                 type == QuantType::FP4;
        const bool bnb4 = type == QuantType::NF4 || type == QuantType::FP4;
        const int variant = decode_variant != 0 ? decode_variant : type == QuantType::Q4_K ? 3 : bnb4 ? (group.job[0].dq ? 5 : 6) : rows_kernel ? 4 : 2;
        with_quantized_format(type, "kernel", [&](auto format) {
          constexpr int T = decltype(format)::value;
          constexpr bool kBnb4 = T == static_cast<int>(QuantType::NF4) || T == static_cast<int>(QuantType::FP4);
          if (kBnb4 && nt == 1 && variant == 5 && cols % 64 == 0 && cols <= 32 * 1024) {
            if constexpr (kBnb4)  // instantiated for nf4 and fp4 only
              launch_with(dependent, bnb4_decode_kernel<T>, grid, kThreads, act_shared_bytes(cols), group, cols, q, d, s);
          } else if (kBnb4 && nt == 1 && variant == 6 && cols % 64 == 0 && cols <= 32 * 1024) {
            if constexpr (kBnb4)
              launch_with(dependent, bnb4_decode_kernel<T, true>, grid, kThreads, act_shared_bytes(cols), group, cols, q, d, s);
          } else if (T == static_cast<int>(QuantType::Q6_K) && nt == 1 && q6k_decode && cols % 256 == 0 &&
                     cols <= kQ6kMaxCols) {
            launch_with(dependent, q6k_decode_kernel, grid, kThreads, q6k_decode_smem(cols), group, cols, q, d, s);
          } else if (T == static_cast<int>(QuantType::Q4_K) && nt == 1 && variant == 3) {
            launch_q4k_decode(group, grid, cols, q, d, s, dependent);
          } else if (kBnb4 && two_tokens) {
            if constexpr (kBnb4) {
              if (group.job[0].dq)
                launch_with(dependent, bnb4_decode_tokens_kernel<T, 2, false>, grid, kThreads, 2 * act_shared_bytes(cols),
                            group, cols, q, d, nblk);
              else
                launch_with(dependent, bnb4_decode_tokens_kernel<T, 2, true>, grid, kThreads, 2 * act_shared_bytes(cols),
                            group, cols, q, d, nblk);
            }
          } else if (T == static_cast<int>(QuantType::Q4_K) && two_tokens) {
            launch_with(dependent, q4k_decode_tokens_kernel<2>, grid, kThreads, 2 * act_shared_bytes(cols), group, cols, q, d,
                        s, nblk);
          } else if (nt == 1 && variant == 4) {
            launch_matvec_rows<T>(group, grid, cols, q, d, s, dependent);
          } else if (nt == 1 && variant == 2) {
            launch_with(dependent, qmatmul_kernel<T, 1, 2>, grid, kThreads, 0, group, cols, q, d, s, nblk, nt);
          } else if (nt == 1 && variant == 1) {
            launch_with(dependent, qmatmul_kernel<T, 1>, grid, kThreads, 0, group, cols, q, d, s, nblk, nt);
          } else if (mma_pass && (T == static_cast<int>(QuantType::Q4_K) || T == static_cast<int>(QuantType::Q5_K) ||
                                  T == static_cast<int>(QuantType::Q6_K) || T == static_cast<int>(QuantType::INT8) ||
                                  T == static_cast<int>(QuantType::Q8_0) || T == static_cast<int>(QuantType::Q4_0) ||
                                  kBnb4)) {
            const unsigned tiles = static_cast<unsigned>(total_rows / kMmaRows);
            if constexpr (T == static_cast<int>(QuantType::Q4_K) || T == static_cast<int>(QuantType::Q5_K)) {
              constexpr bool kQ5 = T == static_cast<int>(QuantType::Q5_K);
              if (nt > 8)
                launch_with(mma_dependent, q4k_mma_kernel<2, kQ5>, tiles, kThreads, 0, group, cols, q, d, s, nblk, nt);
              else
                launch_with(mma_dependent, q4k_mma_kernel<1, kQ5>, tiles, kThreads, 0, group, cols, q, d, s, nblk, nt);
            } else if constexpr (T == static_cast<int>(QuantType::Q4_0)) {
              if (nt > 8)
                launch_with(mma_dependent, q40_mma_kernel<2>, tiles, kThreads, 0, group, cols, q, d, nblk, nt);
              else
                launch_with(mma_dependent, q40_mma_kernel<1>, tiles, kThreads, 0, group, cols, q, d, nblk, nt);
            } else if constexpr (T == static_cast<int>(QuantType::INT8)) {
              if (nt > 8)
                launch_with(mma_dependent, int8_mma_kernel<2>, tiles, kThreads, 0, group, cols, q, d, nblk, nt);
              else
                launch_with(mma_dependent, int8_mma_kernel<1>, tiles, kThreads, 0, group, cols, q, d, nblk, nt);
            } else if constexpr (T == static_cast<int>(QuantType::Q8_0)) {
              if (nt > 8)
                launch_with(mma_dependent, q80_mma_kernel<2>, tiles, kThreads, 0, group, cols, q, d, nblk, nt);
              else
                launch_with(mma_dependent, q80_mma_kernel<1>, tiles, kThreads, 0, group, cols, q, d, nblk, nt);
            } else if constexpr (T == static_cast<int>(QuantType::Q6_K)) {
              if (nt > 8)
                launch_with(mma_dependent, q6k_mma_kernel<2>, tiles, kThreads, 0, group, cols, q, d, nblk, nt);
              else
                launch_with(mma_dependent, q6k_mma_kernel<1>, tiles, kThreads, 0, group, cols, q, d, nblk, nt);
            } else if constexpr (kBnb4) {
              if (nt > 8)
                launch_with(mma_dependent, bnb4_mma_kernel<T, 2>, tiles, kThreads, 0, group, cols, q, d, nblk, nt);
              else
                launch_with(mma_dependent, bnb4_mma_kernel<T, 1>, tiles, kThreads, 0, group, cols, q, d, nblk, nt);
            }
          } else {
            launch_with(dependent, qmatmul_kernel<T, 8>, grid, kThreads, 0, group, cols, q, d, s, nblk, nt);
          }
        });
      }
      first = last;
    }
  }

  static bool rows_multiple_of(const QJobs& group, int64_t k) {
    for (int i = 0; i < group.count; ++i)
      if (group.job[i].rows % k != 0) return false;
    return true;
  }

  // Calls go(std::integral_constant<int, R>{}, grid) with R rows per warp: `rows` (or decode_rows when
  // set) when every matrix of the group has a multiple of it, else fewer; grid = warps-per-row grid / R.
  template <class Go>
  void with_rows_per_warp(const QJobs& group, unsigned grid, int rows, Go&& go) const {
    if (decode_rows > 0) rows = decode_rows;
    for (int i = 0; i < group.count; ++i)
      while (rows > 1 && group.job[i].rows % rows != 0) rows /= 2;
    grid = (grid + rows - 1) / rows;
    if (rows >= 4) {
      go(std::integral_constant<int, 4>{}, grid);
    } else if (rows == 2) {
      go(std::integral_constant<int, 2>{}, grid);
    } else {
      go(std::integral_constant<int, 1>{}, grid);
    }
  }

  void launch_q4k_decode(const QJobs& group, unsigned grid, int64_t cols, const int8_t* q, const float* d, const int* s,
                         bool dependent) {
    with_rows_per_warp(group, grid, 1, [&](auto rows, unsigned g) {
      if (persist_blocks > 0) g = std::min(g, persist_blocks);
      if (q4k_shared_activations && cols <= 32 * 1024)
        launch_with(dependent, q4k_decode_kernel<decltype(rows)::value, true>, g, 256, act_shared_bytes(cols), group,
                    cols, q, d, s);
      else
        launch_with(dependent, q4k_decode_kernel<decltype(rows)::value, false>, g, 256, 0, group, cols, q, d, s);
    });
  }

  template <int T>
  void launch_matvec_rows(const QJobs& group, unsigned grid, int64_t cols, const int8_t* q, const float* d, const int* s,
                          bool dependent) {
    with_rows_per_warp(group, grid, 2, [&](auto rows, unsigned g) {
      launch_with(dependent, qmatvec_kernel<T, decltype(rows)::value>, g, 256, 0, group, cols, q, d, s);
    });
  }

  void plain_matmul(const float* x, int64_t n, const DevMatrix& m, float* y) {
    constexpr int kThreads = 256, kRowsPerBlock = kThreads / 32;
    const unsigned grid = static_cast<unsigned>((m.rows + kRowsPerBlock - 1) / kRowsPerBlock);
    const int t = static_cast<int>(m.type);
    if (t == static_cast<int>(QuantType::BF16) && batch_mma && n > 1 && m.cols % 32 == 0 && m.rows % kMmaRows == 0) {
      const unsigned tiles = static_cast<unsigned>(m.rows / kMmaRows);
      for (int64_t t0 = 0; t0 < n; t0 += 2 * kMmaTileTokens) {
        const int64_t nt = std::min<int64_t>(2 * kMmaTileTokens, n - t0);
        const float* xt = x + t0 * m.cols;
        float* yt = y + t0 * m.rows;
        if (nt > kMmaTileTokens)
          launch(bf16_mma_kernel<2>, tiles, kThreads, 0, m.data, m.row_bytes, m.rows, m.cols, xt, nt, yt);
        else
          launch(bf16_mma_kernel<1>, tiles, kThreads, 0, m.data, m.row_bytes, m.rows, m.cols, xt, nt, yt);
      }
      return;
    }
    for (int64_t t0 = 0; t0 < n; t0 += 8) {
      const int64_t nt = std::min<int64_t>(8, n - t0);
      const float* xt = x + t0 * m.cols;
      float* yt = y + t0 * m.rows;
#define BQ_PLAIN(TYPE)                                                                                            \
  launch(plain_matmul_kernel<static_cast<int>(TYPE), 8>, grid, kThreads, 0, m.data, m.row_bytes, m.rows, m.cols, xt, nt, yt)
      if (t == static_cast<int>(QuantType::BF16) && m.cols % 8 == 0) {
        launch(bf16_matmul_vec_kernel<8>, grid, kThreads, 0, m.data, m.row_bytes, m.rows, m.cols, xt, nt, yt);
        continue;
      }
      if (t == static_cast<int>(QuantType::F32)) BQ_PLAIN(QuantType::F32);
      else if (t == static_cast<int>(QuantType::F16)) BQ_PLAIN(QuantType::F16);
      else BQ_PLAIN(QuantType::BF16);
#undef BQ_PLAIN
    }
  }

  void release(const KVCache& cache) {
    if (graph.cache == &cache) drop_graph();
    if (std::find(batch_graph.caches.begin(), batch_graph.caches.end(), &cache) != batch_graph.caches.end())
      drop_batch_graph();
    if (std::find(last_batch.begin(), last_batch.end(), &cache) != last_batch.end()) last_batch.clear();
    auto it = caches.find(&cache);
    if (it == caches.end()) return;
    cudaSetDevice(device);
    free_kv(it->second);
    caches.erase(it);
  }

  static unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + 255) / 256); }

  // One sequence's rows in a step: rows [row0, row0 + n) of the stacked batch, its KV cache, and
  // its first position at work.pos[index].
  struct Seg {
    int64_t row0, n, n_logits, index;
    DevKv* kv;
    const DecodeSegment* segment;
  };

  // The step's batched attention buffers: done counters zeroed, the sequences' caches uploaded.
  BatchAttention batch_attention_buffers(const std::vector<Seg>& segs) {
    const ModelConfig& c = model.config();
    const int64_t seqs = static_cast<int64_t>(segs.size()), nz = std::min(seqs, kBatchAttentionSeqs);
    const size_t done_bytes = static_cast<size_t>(kBatchAttentionSeqs * c.n_heads) * sizeof(int);
    const size_t part_bytes = static_cast<size_t>(nz * c.n_heads * attention_splits * (c.head_dim + 2)) * sizeof(float);
    const size_t refs_bytes = static_cast<size_t>(seqs) * sizeof(DevKv);
    auto* base = static_cast<char*>(grow(batch_attn, done_bytes + part_bytes + refs_bytes));
    BatchAttention b;
    b.done = reinterpret_cast<int*>(base);
    b.part = reinterpret_cast<float*>(base + done_bytes);
    b.refs = reinterpret_cast<DevKv*>(base + done_bytes + part_bytes);
    host_refs.clear();
    for (const Seg& sg : segs) host_refs.push_back(*sg.kv);
    CUDA_OK(cudaMemsetAsync(b.done, 0, done_bytes, stream));
    if (capturing_batch) {  // a graph's copy node reads pinned memory, refilled before each replay
      std::copy(host_refs.begin(), host_refs.end(), graph_refs);
      CUDA_OK(cudaMemcpyAsync(b.refs, graph_refs, refs_bytes, cudaMemcpyHostToDevice, stream));
    } else {
      CUDA_OK(cudaMemcpyAsync(b.refs, host_refs.data(), refs_bytes, cudaMemcpyHostToDevice, stream));
    }
    return b;
  }

  // Waits for the step, then copies each sequence's logit rows from the pinned buffer to its caller.
  void deliver_logits(const std::vector<Seg>& segs) {
    CUDA_OK(cudaStreamSynchronize(stream));
    const int64_t vocab = model.config().vocab;
    int64_t out_row = 0;
    for (const Seg& sg : segs) {
      if (sg.n_logits > 0)
        std::memcpy(sg.segment->logits, work.host_logits + out_row * vocab, static_cast<size_t>(sg.n_logits * vocab) * sizeof(float));
      out_row += sg.n_logits;
    }
  }

  // Host side of a step: the embedding rows (Gemma's scaled by sqrt(hidden)) into the pinned buffer.
  void stage_embeddings(const std::vector<Seg>& segs) {
    const ModelConfig& c = model.config();
    const int64_t hd = c.hidden;
    const float embed_scale = c.embed_scale ? std::sqrt(static_cast<float>(hd)) : 1.0f;
    for (const Seg& sg : segs) {
      for (int64_t t = 0; t < sg.n; ++t) {
        float* row = work.host_x + (sg.row0 + t) * hd;
        model.weights().embed.row_to_f32(sg.segment->tokens[t], row);
        if (c.embed_scale)
          for (int64_t j = 0; j < hd; ++j) row[j] *= embed_scale;
      }
    }
  }

  // ---- Exact numerics (kernels/exact.h): the CPU engine's exact steps, bit for bit ----
  DevBuf exact_act;  // activation quants and scales of the exact matmuls
  void exact_matmul(const float* x, int64_t n, const DevMatrix& m, float* y) {
    const unsigned row_blocks = static_cast<unsigned>((m.rows + 7) / 8);
    const unsigned token_blocks = static_cast<unsigned>((n + kExactTokens - 1) / kExactTokens);
    if (m.type == QuantType::F32 || m.type == QuantType::F16 || m.type == QuantType::BF16) {
      launch(exact_plain_matvec_kernel, dim3(row_blocks, static_cast<unsigned>(n)), 256, 0, m.type, m.data, m.row_bytes, m.rows,
             m.cols, x, n, y);
      return;
    }
    const int64_t nblk = (m.cols + 31) / 32;
    auto* base = static_cast<char*>(grow(exact_act, static_cast<size_t>(n * nblk) * (32 + sizeof(float))));
    auto* q = reinterpret_cast<int8_t*>(base);
    auto* d = reinterpret_cast<float*>(base + n * nblk * 32);
    launch(exact_quantize_kernel, blocks_for(n * nblk), 256, 0, x, n, m.cols, nblk, q, d);
    launch(n == 1 ? exact_qmatvec_kernel<1> : exact_qmatvec_kernel<kExactTokens>, dim3(row_blocks, token_blocks), 256, 0, m.type, m.data, m.row_bytes, m.rows, m.cols,
           m.dq, q, d, n, y);
  }
  void exact_norm(const float* x, const float* w, int64_t rows, int64_t n, float* out) {
    launch(exact_rms_norm_kernel, static_cast<unsigned>((rows + 7) / 8), 256, 0, x, w, model.config().norm_eps, rows, n, out);
  }

  // exact_attention_kernel's scores, padded as attention_smem_bytes: the compiler's vector loads of the
  // final loop's scores may read up to three past the last (compute-sanitizer: 12-byte reads).
  static size_t exact_score_bytes(int64_t positions) { return attention_smem_bytes(positions); }

  void forward_exact(std::span<const DecodeSegment> segments) {
    const ModelConfig& c = model.config();
    const int64_t hd = c.hidden, qd = c.q_dim(), kvd = c.kv_dim(), ff = c.intermediate;
    int64_t n = 0, n_out = 0;
    for (const DecodeSegment& sg : segments) {
      n += sg.n;
      n_out += sg.n_logits;
    }
    ensure_work(n, std::max<int64_t>(n_out, 1));
    std::vector<Seg> segs;
    int64_t row = 0, longest = 0;
    for (const DecodeSegment& sg : segments) {
      segs.push_back({row, sg.n, sg.n_logits, static_cast<int64_t>(segs.size()), &kv_for(*sg.cache), &sg});
      work.host_pos[segs.size() - 1] = sg.cache->size();
      longest = std::max(longest, sg.cache->size() + sg.n);
      row += sg.n;
    }
    const size_t score_bytes = exact_score_bytes(longest);
    check(score_bytes <= exact_smem_limit, "CUDA exact attention: a context of " + std::to_string(longest) +
                                               " positions is too long (at most " + std::to_string(exact_smem_limit / 4 - 8) + ")");
    stage_embeddings(segs);
    CUDA_OK(cudaMemcpyAsync(work.x, work.host_x, static_cast<size_t>(n * hd) * sizeof(float), cudaMemcpyHostToDevice, stream));
    float* x = work.x;
    for (int64_t li = 0; li < c.n_layers; ++li) {
      const DevLayer& l = layers[static_cast<size_t>(li)];
      exact_norm(x, l.attn_norm, n, hd, work.normed);
      exact_matmul(work.normed, n, l.wq, work.q);
      exact_matmul(work.normed, n, l.wk, work.k);
      exact_matmul(work.normed, n, l.wv, work.v);
      if (l.bq) {
        launch(add_bias_kernel, blocks_for(n * qd), 256, 0, work.q, l.bq, n, qd);
        launch(add_bias_kernel, blocks_for(n * kvd), 256, 0, work.k, l.bk, n, kvd);
        launch(add_bias_kernel, blocks_for(n * kvd), 256, 0, work.v, l.bv, n, kvd);
      }
      if (c.qk_norm) {
        exact_norm(work.q, l.q_norm, n * c.n_heads, c.head_dim, work.q);
        exact_norm(work.k, l.k_norm, n * c.n_kv_heads, c.head_dim, work.k);
      }
      const int64_t window = c.layer_sliding[static_cast<size_t>(li)] ? c.sliding_window : 0;
      for (const Seg& sg : segs) {
        const size_t layer_elems = static_cast<size_t>(sg.kv->capacity * kvd);
        float* kc = static_cast<float*>(sg.kv->k) + li * layer_elems;
        float* vc = static_cast<float*>(sg.kv->v) + li * layer_elems;
        const int64_t pos0 = work.host_pos[sg.index];
        launch(exact_rope_store_kernel, static_cast<unsigned>(sg.n), 256, 0, work.q + sg.row0 * qd, work.k + sg.row0 * kvd,
               work.v + sg.row0 * kvd, inv_freq, pos0, static_cast<int>(c.n_heads), static_cast<int>(c.n_kv_heads),
               static_cast<int>(c.head_dim), static_cast<int>(c.rotary_dim()), kc, vc);
        launch(exact_attention_kernel, dim3(static_cast<unsigned>(c.n_heads), static_cast<unsigned>(sg.n)), 128,
               exact_score_bytes(pos0 + sg.n), work.q + sg.row0 * qd, kc, vc, pos0, static_cast<int>(c.n_heads),
               static_cast<int>(c.n_kv_heads), static_cast<int>(c.head_dim), window, c.attention_scale(), c.attn_softcap,
               work.attn + sg.row0 * qd);
      }
      exact_matmul(work.attn, n, l.wo, work.h);
      if (l.bo) launch(add_bias_kernel, blocks_for(n * hd), 256, 0, work.h, l.bo, n, hd);
      if (c.sandwich_norms) exact_norm(work.h, l.attn_post_norm, n, hd, work.h);
      launch(add_kernel, blocks_for(n * hd), 256, 0, x, work.h, n * hd);

      exact_norm(x, l.ffn_norm, n, hd, work.normed);
      exact_matmul(work.normed, n, l.w_gate, work.gate);
      exact_matmul(work.normed, n, l.w_up, work.up);
      if (l.b_gate) {
        launch(add_bias_kernel, blocks_for(n * ff), 256, 0, work.gate, l.b_gate, n, ff);
        launch(add_bias_kernel, blocks_for(n * ff), 256, 0, work.up, l.b_up, n, ff);
      }
      launch(exact_act_mul_kernel, blocks_for(n * ff), 256, 0, work.gate, work.up, n * ff, c.activation == Activation::GeluTanh);
      exact_matmul(work.gate, n, l.w_down, work.h);
      if (l.b_down) launch(add_bias_kernel, blocks_for(n * hd), 256, 0, work.h, l.b_down, n, hd);
      if (c.sandwich_norms) exact_norm(work.h, l.ffn_post_norm, n, hd, work.h);
      launch(add_kernel, blocks_for(n * hd), 256, 0, x, work.h, n * hd);
    }
    if (n_out > 0) {
      int64_t out_row = 0;  // each sequence's logit rows, normalised into consecutive rows of work.h
      for (const Seg& sg : segs) {
        if (sg.n_logits == 0) continue;
        exact_norm(x + (sg.row0 + sg.n - sg.n_logits) * hd, final_norm, sg.n_logits, hd, work.h + out_row * hd);
        out_row += sg.n_logits;
      }
      exact_matmul(work.h, n_out, output, work.logits);
      if (c.final_softcap > 0.0f)
        launch(exact_softcap_kernel, blocks_for(n_out * c.vocab), 256, 0, work.logits, n_out * c.vocab, c.final_softcap);
      CUDA_OK(cudaMemcpyAsync(work.host_logits, work.logits, static_cast<size_t>(n_out * c.vocab) * sizeof(float),
                              cudaMemcpyDeviceToHost, stream));
    }
    CUDA_OK(cudaGetLastError());
    deliver_logits(segs);
    sample_device_memory();
  }

  template <class KV>
  void forward_impl(std::span<const DecodeSegment> segments) {
    const ModelConfig& c = model.config();
    const ModelWeights& w = model.weights();
    int64_t n = 0, n_out = 0;
    for (const DecodeSegment& sg : segments) {
      n += sg.n;
      n_out += sg.n_logits;
    }
    ensure_work(n, std::max<int64_t>(n_out, 1));
    // Sequences with enough rows for the tensor-core GEMM are stacked first (see gemm_rows).
    std::vector<const DecodeSegment*> order;
    for (const DecodeSegment& sg : segments)
      if (tensor_cores() && sg.n >= kGemmMinTokens) order.push_back(&sg);
    // ... and among them those with enough logit rows for the GEMM first too (the output matmul).
    std::stable_sort(order.begin(), order.end(),
                     [](const DecodeSegment* a, const DecodeSegment* b) { return a->n_logits > b->n_logits; });
    gemm_rows = 0;
    for (const DecodeSegment* sg : order) gemm_rows += sg->n;
    for (const DecodeSegment& sg : segments)
      if (!(tensor_cores() && sg.n >= kGemmMinTokens)) order.push_back(&sg);
    if (batch_decode_gemm(segments)) gemm_rows = n;
    std::vector<Seg> segs;
    int64_t smem_len = 0, row = 0;
    for (const DecodeSegment* sg : order) {
      const int64_t index = static_cast<int64_t>(segs.size());
      segs.push_back({row, sg->n, sg->n_logits, index, &kv_for(*sg->cache), sg});
      work.host_pos[index] = sg->cache->size();
      smem_len = std::max(smem_len, sg->cache->size() + sg->n);
      row += sg->n;
    }
    stage_embeddings(segs);
    // Attention's score buffer: the whole cache when replaying a graph (any position), else what is used.
    const KVCache& first_cache = *segments[0].cache;
    const int64_t graph_smem_len = segs[0].kv->capacity;
    const bool use_graph = segments.size() == 1 && n == 1 && n_out == 1 && decode_attention_fits(graph_smem_len);
    bool replay = false;  // an instantiated graph launched again: it allocates nothing
    // A batched decode step on the integer kernels (see batch_graph): the attention sized for the
    // largest cache's capacity, as a one-sequence graph is for its cache's.
    const int64_t seqs = static_cast<int64_t>(segs.size());
    int64_t batch_len = 0;
    for (const Seg& sg : segs) batch_len = std::max(batch_len, sg.kv->capacity);
    const bool batch_step = batch_graphs_on && seqs > 1 && seqs <= kBatchAttentionSeqs && n == seqs && n_out == seqs &&
                            gemm_rows == 0 && fused_decode_ok() && batch_attention_on && decode_attention_fits(batch_len);
    std::vector<const KVCache*> batch_key;
    if (batch_step)
      for (const Seg& sg : segs) batch_key.push_back(sg.segment->cache);
    const bool batch_graph_ready = batch_step && batch_graph.exec != nullptr && batch_graph.caches == batch_key &&
                                   batch_graph.generation == work.generation && batch_graph.attn == batch_attn.ptr;
    const bool capture_batch = batch_step && !batch_graph_ready && batch_key == last_batch;
    last_batch = batch_step ? batch_key : std::vector<const KVCache*>{};
    if (batch_graph_ready) {
      for (size_t i = 0; i < segs.size(); ++i) graph_refs[i] = *segs[i].kv;
      CUDA_OK(cudaGraphLaunch(batch_graph.exec, stream));
      replay = true;
    } else if (capture_batch) {
      drop_batch_graph();
      if (graph_refs == nullptr) CUDA_OK(cudaMallocHost(&graph_refs, static_cast<size_t>(kBatchAttentionSeqs) * sizeof(DevKv)));
      cudaGraph_t g = nullptr;
      CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
      capturing_batch = true;
      try {
        enqueue_step<KV>(segs, n, n_out, batch_len);
      } catch (...) {
        capturing_batch = false;
        cudaStreamEndCapture(stream, &g);
        if (g) cudaGraphDestroy(g);
        cudaGetLastError();  // a launch error invalidated the capture: not the next call's error
        throw;
      }
      capturing_batch = false;
      CUDA_OK(cudaStreamEndCapture(stream, &g));
      const cudaError_t e = cudaGraphInstantiate(&batch_graph.exec, g, 0);
      cudaGraphDestroy(g);
      CUDA_OK(e);
      batch_graph.caches = batch_key;
      batch_graph.generation = work.generation;
      batch_graph.attn = batch_attn.ptr;
      CUDA_OK(cudaGraphLaunch(batch_graph.exec, stream));
    } else if (!use_graph) {
      enqueue_step<KV>(segs, n, n_out, smem_len);
    } else {
      const bool stale = graph.exec == nullptr || graph.cache != &first_cache || graph.generation != work.generation;
      replay = !stale;
      if (stale) {
        drop_graph();
        cudaGraph_t g = nullptr;
        CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
        try {
          enqueue_step<KV>(segs, 1, 1, graph_smem_len);
        } catch (...) {
          cudaStreamEndCapture(stream, &g);
          if (g) cudaGraphDestroy(g);
          cudaGetLastError();  // a launch error invalidated the capture: not the next call's error
          throw;
        }
        CUDA_OK(cudaStreamEndCapture(stream, &g));
        const cudaError_t e = cudaGraphInstantiate(&graph.exec, g, 0);
        cudaGraphDestroy(g);
        CUDA_OK(e);
        graph.cache = &first_cache;
        graph.generation = work.generation;
      }
      CUDA_OK(cudaGraphLaunch(graph.exec, stream));
    }
    deliver_logits(segs);
    // The device's use is sampled after every step that could have changed it (allocations, first
    // launches loading kernels, a graph's instantiation); a replayed graph cannot, and cudaMemGetInfo
    // cost ~1% of a decode step's time (H200, q4_k 8B: 451-459 -> 457-460 tok/s).
    if (!replay) sample_device_memory();
  }

  // Every device operation of one step, on `stream` (capturable): inputs from the pinned buffers,
  // logits back into them. smem_len: positions the attention score buffer must hold.
  // Sequences of a batch share every matmul (their rows stacked); RoPE, the KV cache and attention
  // run per sequence.
  template <class KV>
  void enqueue_step(const std::vector<Seg>& segs, int64_t n, int64_t n_logits, int64_t smem_len) {
    const ModelConfig& c = model.config();
    const int64_t hd = c.hidden, qd = c.q_dim(), kvd = c.kv_dim(), ff = c.intermediate;
    CUDA_OK(cudaMemcpyAsync(work.pos, work.host_pos, segs.size() * sizeof(int64_t), cudaMemcpyHostToDevice, stream));
    CUDA_OK(cudaMemcpyAsync(work.x, work.host_x, static_cast<size_t>(n * hd) * sizeof(float), cudaMemcpyHostToDevice,
                            stream));
    // Residual adds are deferred into the next norm, which also quantizes the activations of the
    // integer matmuls after it (one launch instead of three).
    bool pending = false;  // work.h holds a residual not yet added into the residual stream
    const bool fusable = hd % 32 == 0;
    const bool fused_decode = fused_decode_ok();
    bool all_single = true;
    for (const Seg& sg : segs) all_single = all_single && sg.n == 1;
    const BatchAttention batch = fused_decode && all_single && segs.size() > 1 && batch_attention_on
                                     ? batch_attention_buffers(segs)
                                     : BatchAttention{};
    const bool batch_decode_step = all_single && n > 1 && gemm_rows == n;  // see batch_gemm_min
    batch_step_pdl = dependent_batch && all_single && n > 1;
    // The residual stream alternates between two buffers (the fused norm reads one while writing the
    // other); the norm's output goes to work.normed.
    // Column slices of the fused norm: 256 columns per block for a few rows (decode), whole rows for
    // many (a prompt), where every block re-reading its row would cost more than it saves (and one
    // block per row may update its row in place).
    const bool sliced_norm = n <= kSlicedNormRows;
    const int64_t norm_slice = sliced_norm ? 256 : (hd + 31) / 32 * 32;
    float* x = work.x;
    float* x_next = sliced_norm ? work.x2 : work.x;
    // Steps with tensor-core rows: the kernels before each matmul also write its input in bf16 (the
    // GEMM's operand), into this buffer sized for the widest input; no separate conversion pass.
    __nv_bfloat16* step_bf16 = nullptr;
    if (gemm_rows > 0)
      step_bf16 = static_cast<__nv_bfloat16*>(grow(gemm_x, static_cast<size_t>(n * std::max({hd, qd, ff})) * 2));
    const auto norm_into_h = [&](const float* w, bool quantize) {
      if (fusable) {
        launch_with(pdl(n), add_norm_quant_kernel, dim3(static_cast<unsigned>(n), static_cast<unsigned>((hd + norm_slice - 1) / norm_slice)),
               1024, 0, x, pending ? work.h : nullptr, x_next, w, c.norm_eps, hd, norm_slice, work.normed, step_bf16,
               quantize ? work.aq : nullptr, work.ad, work.as);
        if (pending && sliced_norm) std::swap(x, x_next);
      } else {
        if (pending) launch(add_kernel, blocks_for(n * hd), 256, 0, x, work.h, n * hd);
        launch(rms_norm_kernel, static_cast<unsigned>(n), 1024, 0, x, w, c.norm_eps, hd, work.normed);
      }
      pending = false;
    };
    for (int64_t li = 0; li < c.n_layers; ++li) {
      const DevLayer& l = layers[static_cast<size_t>(li)];
      const bool quant_qkv = fusable && integer_path(n, {&l.wq, &l.wk, &l.wv});
      norm_into_h(l.attn_norm, quant_qkv);
      {
        const Job qkv[3] = {{&l.wq, work.q}, {&l.wk, work.k}, {&l.wv, work.v}};
        matmuls(work.normed, n, qkv, 3, quant_qkv, fusable ? step_bf16 : nullptr);
      }
      if (l.bq) {
        launch(add_bias_kernel, blocks_for(n * qd), 256, 0, work.q, l.bq, n, qd);
        launch(add_bias_kernel, blocks_for(n * kvd), 256, 0, work.k, l.bk, n, kvd);
        launch(add_bias_kernel, blocks_for(n * kvd), 256, 0, work.v, l.bv, n, kvd);
      }
      if (c.qk_norm) {
        launch(rms_norm_kernel, static_cast<unsigned>(n * c.n_heads), 128, 0, work.q, l.q_norm, c.norm_eps, c.head_dim,
                                                                                  work.q);
        launch(rms_norm_kernel, static_cast<unsigned>(n * c.n_kv_heads), 128, 0, work.k, l.k_norm, c.norm_eps,
                                                                                     c.head_dim, work.k);
      }
      const int64_t window = c.layer_sliding[static_cast<size_t>(li)] ? c.sliding_window : 0;
      // Decode steps (every sequence one new token) quantize the attention output for the output
      // projection inside the fused attention kernel.
      const bool quant_o = fused_decode && all_single && integer_path(n, {&l.wo});
      bool attn_bf16 = false;  // the attention output is in step_bf16 too
      // The fused decode attention's shape for the step (its longest sequence).
      const int64_t nblk_o = qd / 32;
      const auto decode_attention = [&](const float* q, const float* k_new, const float* v_new, const int64_t* pos,
                                        KV* kc, KV* vc, __half* ks, __half* vs, float* out, int8_t* aq, float* ad, int* as,
                                        float* part, int* done, const DevKv* refs, unsigned sequences) {
        const int64_t split_len = decode_split_len(smem_len);
        check(decode_smem(split_len) <= decode_smem_bytes,
              "CUDA attention: a context of " + std::to_string(smem_len) + " positions is too long for " +
                  std::to_string(attention_splits) + " blocks per head (BIOQUANT_CUDA_SPLITS)");
        // No more blocks per head than the context can give work to (a graph is captured for the cache's capacity).
        const int64_t split_blocks = std::min<int64_t>(attention_splits, std::max<int64_t>(1, (smem_len + attention_min_chunk - 1) / attention_min_chunk));
        const int heads_per_block = decode_heads_per_block(split_len);
        const int64_t blocks_per_group = (c.n_heads / c.n_kv_heads + heads_per_block - 1) / heads_per_block;
        // Each lane's chunks of q in registers: 4 for heads up to 128 wide, 8 up to 256.
        launch_with(pdl(n), c.head_dim <= 128 ? attention_decode_kernel<KV, 4> : attention_decode_kernel<KV, 8>,
               dim3(static_cast<unsigned>(c.n_kv_heads * blocks_per_group), static_cast<unsigned>(split_blocks), sequences),
               heads_per_block * kDecodeHeadThreads, decode_smem(split_len), q, k_new, v_new, inv_freq, pos,
               static_cast<int>(c.n_heads), static_cast<int>(c.n_kv_heads), static_cast<int>(c.head_dim),
               static_cast<int>(c.rotary_dim()), kc, vc, ks, vs, window, c.attention_scale(), c.attn_softcap, out, aq, ad,
               as, attention_min_chunk, part, done, stage_len(split_len), static_cast<int>(decode_score_ld(split_len)), refs,
               static_cast<int>(li));
      };
      if (batch.refs != nullptr) {
        // A decode step of several sequences: one launch per kBatchAttentionSeqs of them (blockIdx.z),
        // each block finding its sequence's cache in batch.refs (sequence i is row i, position i).
        for (int64_t z0 = 0; z0 < static_cast<int64_t>(segs.size()); z0 += kBatchAttentionSeqs) {
          const unsigned nz = static_cast<unsigned>(std::min<int64_t>(kBatchAttentionSeqs, static_cast<int64_t>(segs.size()) - z0));
          decode_attention(work.q + z0 * qd, work.k + z0 * kvd, work.v + z0 * kvd, work.pos + z0, nullptr, nullptr, nullptr,
                           nullptr, work.attn + z0 * qd, quant_o ? work.aq + z0 * nblk_o * 32 : nullptr, work.ad + z0 * nblk_o,
                           work.as + z0 * nblk_o, batch.part, batch.done, batch.refs + z0, nz);
        }
      }
      for (const Seg& sg : segs) {
        if (batch.refs != nullptr) break;
        const size_t layer_elems = static_cast<size_t>(sg.kv->capacity * kvd);
        KV* kc = static_cast<KV*>(sg.kv->k) + li * layer_elems;
        KV* vc = static_cast<KV*>(sg.kv->v) + li * layer_elems;
        __half* ks = sg.kv->k_scale ? sg.kv->k_scale + li * layer_elems / 32 : nullptr;
        __half* vs = sg.kv->v_scale ? sg.kv->v_scale + li * layer_elems / 32 : nullptr;
        float* q = work.q + sg.row0 * qd;
        float* out = work.attn + sg.row0 * qd;
        const int64_t* pos = work.pos + sg.index;
        if (fused_decode && sg.n == 1) {
          decode_attention(q, work.k + sg.row0 * kvd, work.v + sg.row0 * kvd, pos, kc, vc, ks, vs, out,
                           quant_o ? work.aq + sg.row0 * nblk_o * 32 : nullptr, work.ad + sg.row0 * nblk_o,
                           work.as + sg.row0 * nblk_o, work.attn_part, work.attn_done, nullptr, 1);
          continue;
        }
        // Prompts long enough for the tensor-core matmuls also take their attention there, when the
        // cache is bf16 and one query head's scores fit the gate buffer (else: the f32 tiled kernel).
        const int64_t len = work.host_pos[sg.index] + sg.n, ld = (len + 7) / 8 * 8, group = c.n_heads / c.n_kv_heads;
        // The scores of a call live in work.gate: whole KV groups per call when one fits, else a part
        // of a group's query heads (a long context: one group's scores outgrow the buffer from
        // ~3.5K positions of the 8B shape, which sent such prompts to the f32 tiled kernel).
        const int64_t scores_budget = work.tokens * ff * static_cast<int64_t>(sizeof(float));
        const int64_t head_bytes = sg.n * ld * static_cast<int64_t>(sizeof(float));
        const int64_t heads_per_call = std::min(group, scores_budget / head_bytes);
        const int64_t groups_per_call =
            heads_per_call == group ? std::min<int64_t>(c.n_kv_heads, scores_budget / (group * head_bytes)) : 1;
        const bool tensor_attention = std::is_same_v<KV, __nv_bfloat16> && sg.n >= kGemmMinTokens && tensor_core_attention &&
                                      blas.batched_ready() && c.head_dim % 8 == 0 && heads_per_call >= 1;
        __nv_bfloat16* q_heads = nullptr;
        if (tensor_attention)
          q_heads = static_cast<__nv_bfloat16*>(grow(gemm_x, static_cast<size_t>(c.n_heads * sg.n * c.head_dim) * 2));
        launch(rope_store_kernel<KV>, static_cast<unsigned>(sg.n), 1024, 0, q, work.k + sg.row0 * kvd, work.v + sg.row0 * kvd,
               inv_freq, pos, static_cast<int>(c.n_heads), static_cast<int>(c.n_kv_heads), static_cast<int>(c.head_dim),
               static_cast<int>(c.rotary_dim()), kc, vc, ks, vs, q_heads, sg.n);
        if (tensor_attention) {
          const int64_t d = c.head_dim, rows = group * sg.n;  // one KV head's query rows
          const auto* kb = reinterpret_cast<const __nv_bfloat16*>(kc);
          const auto* vb = reinterpret_cast<const __nv_bfloat16*>(vc);
          float* scores = work.gate;
          auto* probs = reinterpret_cast<__nv_bfloat16*>(work.up);
          float* o_heads = work.h;  // free between the norm that consumed it and the output projection
          // Calls of gc KV groups, each of its query heads [h0, h0 + hc): rows r = (head, token) from
          // (g0 * group + h0) * n on (q_heads and o_heads are head-major).
          for (int64_t g0 = 0; g0 < c.n_kv_heads; g0 += groups_per_call) {
            const int64_t gc = std::min(groups_per_call, c.n_kv_heads - g0);
            for (int64_t h0 = 0; h0 < group; h0 += heads_per_call) {
              const int64_t call_rows = std::min(heads_per_call, group - h0) * sg.n;
              const int64_t first_row = g0 * rows + h0 * sg.n;
              // S [call_rows][len] (row-major, ld) = Q_g [call_rows][d] K_g[len][d]^T
              blas.gemm_batched(CUBLAS_OP_T, CUBLAS_OP_N, len, call_rows, d, kb + g0 * d, kvd, d, q_heads + first_row * d, d,
                                rows * d, scores, ld, call_rows * ld, gc);
              launch(attention_softmax_kernel, static_cast<unsigned>(gc * call_rows), 256, 0, scores, ld, sg.n, len, pos,
                     window, c.attention_scale(), c.attn_softcap, probs);
              // O_g [call_rows][d] = P [call_rows][len] V_g [len][d]
              blas.gemm_batched(CUBLAS_OP_N, CUBLAS_OP_N, d, call_rows, len, vb + g0 * d, kvd, d, probs, ld, call_rows * ld,
                                o_heads + first_row * d, d, rows * d, gc);
            }
          }
          launch(heads_to_tokens_kernel, blocks_for(sg.n * qd), 256, 0, o_heads, sg.n, static_cast<int>(c.n_heads),
                 static_cast<int>(c.head_dim), out, segs.size() == 1 ? step_bf16 : nullptr);
          attn_bf16 = segs.size() == 1;
        } else if (sg.n > 1 && c.head_dim <= kMaxHeadDim && c.head_dim % 4 == 0) {
          launch(attention_prefill_kernel<KV>, dim3(static_cast<unsigned>(c.n_heads), static_cast<unsigned>((sg.n + kQTile - 1) / kQTile)), 128,
                 prefill_attention_smem(static_cast<int>(c.head_dim)), q, kc, vc, ks, vs, pos, sg.n, static_cast<int>(c.n_heads), static_cast<int>(c.n_kv_heads),
                  static_cast<int>(c.head_dim), window, c.attention_scale(), c.attn_softcap, out);
        } else {
          const size_t smem = attention_smem_bytes(smem_len);
          check(smem <= attention_smem_limit, "CUDA attention: a context of " + std::to_string(smem_len) + " positions is too long");
          launch(attention_kernel<KV>, dim3(static_cast<unsigned>(c.n_heads), static_cast<unsigned>(sg.n)), 128, smem, q, kc, vc, ks, vs, pos, static_cast<int>(c.n_heads), static_cast<int>(c.n_kv_heads),
              static_cast<int>(c.head_dim), window, c.attention_scale(), c.attn_softcap, out);
        }
      }
      matmul(work.attn, n, l.wo, work.h, quant_o, attn_bf16 ? step_bf16 : nullptr);
      if (l.bo) launch(add_bias_kernel, blocks_for(n * hd), 256, 0, work.h, l.bo, n, hd);
      if (c.sandwich_norms)
        launch(rms_norm_kernel, static_cast<unsigned>(n), 1024, 0, work.h, l.attn_post_norm, c.norm_eps, hd, work.h);
      pending = true;

      const bool quant_gate_up = fusable && integer_path(n, {&l.w_gate, &l.w_up});
      norm_into_h(l.ffn_norm, quant_gate_up);
      {
        const Job gate_up[2] = {{&l.w_gate, work.gate}, {&l.w_up, work.up}};
        matmuls(work.normed, n, gate_up, 2, quant_gate_up, fusable ? step_bf16 : nullptr);
      }
      if (l.b_gate) {
        launch(add_bias_kernel, blocks_for(n * ff), 256, 0, work.gate, l.b_gate, n, ff);
        launch(add_bias_kernel, blocks_for(n * ff), 256, 0, work.up, l.b_up, n, ff);
      }
      const bool gelu = c.activation == Activation::GeluTanh;
      const bool quant_down = ff % 32 == 0 && integer_path(n, {&l.w_down});
      if (quant_down) {
        launch_with(pdl(n), act_mul_quant_kernel, blocks_for(n * ff), 256, 0, work.gate, work.up, n, ff, gelu, work.aq, work.ad,
                                                                      work.as);
      } else {
        launch(act_mul_kernel, blocks_for(n * ff), 256, 0, work.gate, work.up, n * ff, gelu, step_bf16);
      }
      matmul(work.gate, n, l.w_down, work.h, quant_down, quant_down ? nullptr : step_bf16);
      if (l.b_down) launch(add_bias_kernel, blocks_for(n * hd), 256, 0, work.h, l.b_down, n, hd);
      if (c.sandwich_norms)
        launch(rms_norm_kernel, static_cast<unsigned>(n), 1024, 0, work.h, l.ffn_post_norm, c.norm_eps, hd, work.h);
      pending = true;
    }
    if (pending) launch(add_kernel, blocks_for(n * hd), 256, 0, x, work.h, n * hd);
    CUDA_OK(cudaGetLastError());
    if (n_logits > 0) {
      // Each sequence's last rows, normalised into consecutive rows of work.h.
      // A run of sequences whose logit rows follow each other in x (decode steps: every row) is one launch.
      int64_t out_row = 0;
      for (size_t i = 0; i < segs.size();) {
        if (segs[i].n_logits == 0) {
          ++i;
          continue;
        }
        const int64_t first = segs[i].row0 + segs[i].n - segs[i].n_logits;
        int64_t rows = segs[i].n_logits;
        size_t j = i + 1;
        for (; j < segs.size() && segs[j].n == segs[j].n_logits && segs[j].row0 == first + rows; ++j) rows += segs[j].n;
        launch(rms_norm_kernel, static_cast<unsigned>(rows), 1024, 0, x + first * hd, final_norm, c.norm_eps, hd,
               work.h + out_row * hd);
        out_row += rows;
        i = j;
      }
      // The output matmul's rows: each sequence's logit rows on the GEMM when it has that many.
      const int64_t step_gemm_rows = gemm_rows;
      gemm_rows = 0;
      for (const Seg& sg : segs)
        if (tensor_cores() && sg.n_logits >= kGemmMinTokens) gemm_rows += sg.n_logits;
      if (batch_decode_step) gemm_rows = n_logits;  // see batch_gemm_min
      matmul(work.h, n_logits, output, work.logits);
      gemm_rows = step_gemm_rows;
      if (c.final_softcap > 0.0f)
        launch(softcap_kernel, blocks_for(n_logits * c.vocab), 256, 0, work.logits, n_logits * c.vocab, c.final_softcap);
      CUDA_OK(cudaGetLastError());
      CUDA_OK(cudaMemcpyAsync(work.host_logits, work.logits, static_cast<size_t>(n_logits * c.vocab) * sizeof(float),
                              cudaMemcpyDeviceToHost, stream));
    }
  }
};

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

std::string cuda_device_description(int device) {
  check(device >= 0 && device < cuda_device_count(), "no CUDA device " + std::to_string(device));
  cudaDeviceProp p{};
  CUDA_OK(cudaGetDeviceProperties(&p, device));
  char mem[32];
  std::snprintf(mem, sizeof mem, "%.1f", static_cast<double>(p.totalGlobalMem) / (1024.0 * 1024.0 * 1024.0));
  std::string out(p.name);
  out.append(" (sm_").append(std::to_string(p.major)).append(std::to_string(p.minor)).append(", ").append(mem).append(" GiB)");
  return out;
}

double cuda_copy_bandwidth(int device) {
  CUDA_OK(cudaSetDevice(device));
  const size_t n = size_t{1} << 30;
  void *a = nullptr, *b = nullptr;
  CUDA_OK(cudaMalloc(&a, n));
  if (cudaMalloc(&b, n) != cudaSuccess) {
    cudaFree(a);
    throw Error("CUDA: no room for the 2 GiB bandwidth probe");
  }
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  float best_ms = 1e30f;
  cudaMemcpy(b, a, n, cudaMemcpyDeviceToDevice);  // warm-up
  for (int i = 0; i < 5; ++i) {
    cudaEventRecord(e0);
    cudaMemcpy(b, a, n, cudaMemcpyDeviceToDevice);
    cudaEventRecord(e1);
    cudaEventSynchronize(e1);
    float ms = 0.0f;
    cudaEventElapsedTime(&ms, e0, e1);
    best_ms = std::min(best_ms, ms);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cudaFree(a);
  cudaFree(b);
  return 2.0 * static_cast<double>(n) / (static_cast<double>(best_ms) * 1e-3) / 1e9;
}

GpuDecoder::GpuDecoder(const Model& model, int device, KvType kv, bool exact)
    : impl_(std::make_unique<Impl>(model, device, kv, exact)) {
  check(!exact || kv == KvType::F32, "exact numerics need an f32 KV cache (--kv-cache f32), as the CPU engine keeps");
  check(device >= 0 && device < cuda_device_count(), "no CUDA device " + std::to_string(device) + " (" +
                                                         std::to_string(cuda_device_count()) + " found)");
  CUDA_OK(cudaSetDevice(device));
  // bf16 tensor cores (the prompt path) need Ampere or newer. The build carries sm_80 and sm_90 code
  // (CMakeLists.txt); the decode steps' dependent launches need the sm_90 code's griddepcontrol
  // instructions, so they are on only where that code runs (not on Ampere or Ada cards).
  int major = 0;
  CUDA_OK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  check(major >= 8, "CUDA: " + cuda_device_description(device) + " is older than the Ampere cards (sm_80) BioQuant's kernels need");
  cudaFuncAttributes kernel_image{};
  const cudaError_t image = cudaFuncGetAttributes(&kernel_image, add_norm_quant_kernel);
  if (image != cudaSuccess) cudaGetLastError();
  check(image == cudaSuccess, "CUDA: this build has no kernels for " + cuda_device_description(device) +
                                  " (set CMAKE_CUDA_ARCHITECTURES to include it): " + cudaGetErrorString(image));
  if (kernel_image.ptxVersion < 90) impl_->dependent_decode = false;
  check(kv != KvType::Q8 || model.config().kv_dim() % 32 == 0,
        "a q8 KV cache needs K/V rows that are a multiple of 32 values (this model has " +
            std::to_string(model.config().kv_dim()) + ")");
  // The context reserves each thread's stack for every thread the card can hold: at the default 1 KB,
  // 264 MiB of an H100 (measured: 527 -> 263 MiB for a bare context at 0). Our kernels' frames are at
  // most 32 bytes, cuBLAS's GEMMs need none, and the driver raises the limit for a kernel that needs
  // more, so 64 bytes costs nothing but the memory it frees (BIOQUANT_CUDA_STACK=bytes to compare).
  {
    const std::optional<size_t> knob = cuda_stack_knob();
    const size_t stack = knob.value_or(kThreadStackBytes);
    size_t current = 0;
    CUDA_OK(cudaDeviceGetLimit(&current, cudaLimitStackSize));
    if (knob || stack < current) CUDA_OK(cudaDeviceSetLimit(cudaLimitStackSize, stack));
  }
  CUDA_OK(cudaStreamCreate(&impl_->stream));
  CUDA_OK(cudaStreamCreateWithFlags(&impl_->dequant_stream, cudaStreamNonBlocking));
  for (int b = 0; b < 2; ++b) {
    CUDA_OK(cudaEventCreateWithFlags(&impl_->tile_ready[b], cudaEventDisableTiming));
    CUDA_OK(cudaEventCreateWithFlags(&impl_->tile_free[b], cudaEventDisableTiming));
  }
  const size_t before_blas = device_used_now();
  impl_->blas.open(impl_->stream);
  impl_->sample_device_memory();
  impl_->blas_bytes = impl_->device_used_peak > before_blas ? impl_->device_used_peak - before_blas : 0;
  impl_->device_used_at_start = impl_->device_used_peak;
  impl_->gemm_tile_bytes = static_cast<size_t>(cuda_knob_int("BIOQUANT_CUDA_TILE_MB", 0)) << 20;
  if (impl_->gemm_tile_bytes == 0) impl_->gemm_tile_bytes = gpu_gemm_tile_bytes(model.weight_bytes());
  int sms = 0;
  CUDA_OK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  if (const int k = cuda_knob_int("BIOQUANT_CUDA_PERSIST", 0); k > 0) impl_->persist_blocks = static_cast<unsigned>(k * sms);
  if (impl_->attention_splits == 0)
    impl_->attention_splits = gpu_attention_splits(sms, static_cast<int>(model.config().n_heads));
  // Shared memory per block (opt-in) sizes the attention kernels' score buffers: long contexts
  // take more decode splits' worth of it, or are refused, on cards with less than an H100. The
  // kernels' attributes (per device, shared by every decoder on it) allow what the card has beside
  // their static shared memory; this decoder's limits (BIOQUANT_CUDA_SMEM_KB: a smaller card's)
  // decide what it launches.
  int smem_optin = 0;
  CUDA_OK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  size_t card_smem = static_cast<size_t>(smem_optin), usable_smem = card_smem;
  if (const int kb = cuda_knob_int("BIOQUANT_CUDA_SMEM_KB", 0); kb > 0) usable_smem = std::min(usable_smem, static_cast<size_t>(kb) * 1024);
  const auto dynamic_room = [&](auto kernel, size_t total) {  // what `total` leaves beside the kernel's static shared memory
    cudaFuncAttributes a{};
    CUDA_OK(cudaFuncGetAttributes(&a, kernel));
    return total > a.sharedSizeBytes ? total - a.sharedSizeBytes : size_t{0};
  };
  const size_t prefill_smem = prefill_attention_smem(kMaxHeadDim);
  check(dynamic_room(attention_prefill_kernel<float>, usable_smem) >= prefill_smem,
        "CUDA: " + cuda_device_description(device) + " has " + std::to_string(usable_smem / 1024) +
            " KB of shared memory per block; the attention kernels need " + std::to_string(prefill_smem / 1024 + 1) + " KB");
  impl_->decode_smem_bytes = dynamic_room(attention_decode_kernel<float, 8>, usable_smem);
  impl_->attention_smem_limit = std::min(kAttentionSmemBytes, dynamic_room(attention_kernel<float>, usable_smem));
  const int attention_smem = static_cast<int>(std::min(kAttentionSmemBytes, dynamic_room(attention_kernel<float>, card_smem)));
  const int decode_smem = static_cast<int>(dynamic_room(attention_decode_kernel<float, 8>, card_smem));
  const int prefill = static_cast<int>(prefill_smem);
  const auto allow = [](auto kernel, int bytes) { CUDA_OK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes)); };
  allow(attention_kernel<float>, attention_smem);
  allow(attention_kernel<__nv_bfloat16>, attention_smem);
  allow(attention_kernel<int8_t>, attention_smem);
  allow(attention_decode_kernel<float, 4>, decode_smem);
  allow(attention_decode_kernel<__nv_bfloat16, 4>, decode_smem);
  allow(attention_decode_kernel<int8_t, 4>, decode_smem);
  allow(attention_decode_kernel<float, 8>, decode_smem);
  allow(attention_decode_kernel<__nv_bfloat16, 8>, decode_smem);
  allow(attention_decode_kernel<int8_t, 8>, decode_smem);
  allow(attention_prefill_kernel<float>, prefill);
  allow(attention_prefill_kernel<__nv_bfloat16>, prefill);
  allow(attention_prefill_kernel<int8_t>, prefill);
  impl_->exact_smem_limit = dynamic_room(exact_attention_kernel, usable_smem);
  allow(exact_attention_kernel, static_cast<int>(dynamic_room(exact_attention_kernel, card_smem)));
  allow(q6k_decode_kernel, static_cast<int>(q6k_decode_smem(kQ6kMaxCols)));
  {
    int16_t nf4[16], fp4[16];  // Q1.14, as the CPU kernels
    bnb_codebook_q14(QuantType::NF4, nf4);
    bnb_codebook_q14(QuantType::FP4, fp4);
    CUDA_OK(cudaMemcpyToSymbol(c_nf4_q14, nf4, sizeof nf4));
    CUDA_OK(cudaMemcpyToSymbol(c_fp4_q14, fp4, sizeof fp4));
    const auto upload_permute = [](const int16_t* levels, const void* symbol, const char* name) {
      const std::optional<Bnb4PermuteTables> t = bnb4_permute_tables(levels);
      if (!t) throw Error(std::string("internal: no byte-permute tables for the ") + name + " codebook");
      CUDA_OK(cudaMemcpyToSymbol(symbol, &*t, sizeof(Bnb4PermuteTables)));  // the symbol's address: the C API
    };
    upload_permute(nf4, c_nf4_permute, "nf4");
    upload_permute(fp4, c_fp4_permute, "fp4");
    CUDA_OK(cudaMemcpyToSymbol(c_dynamic_map, bnb_dynamic_map(), 256 * sizeof(float)));
    const unsigned early = static_cast<unsigned>((cuda_knob_int("BIOQUANT_CUDA_EARLY", 3) - 1) * sms);
    CUDA_OK(cudaMemcpyToSymbol(c_early_blocks, &early, sizeof early));
  }
  const ModelConfig& c = model.config();
  const ModelWeights& w = model.weights();
  std::vector<float> inv_freq(static_cast<size_t>(c.rotary_dim() / 2));
  rope_inv_freq(c.rope, c.rotary_dim(), inv_freq.data());
  {
    const size_t total = gpu_weight_bytes(model, [](const Matrix& m) { return m.nbytes(); });
    impl_->reserve_weights(total);
  }
  for (const LayerWeights& l : w.layers) {
    DevLayer d;
    d.wq = impl_->upload_matrix(l.wq);
    d.wk = impl_->upload_matrix(l.wk);
    d.wv = impl_->upload_matrix(l.wv);
    d.wo = impl_->upload_matrix(l.wo);
    d.w_gate = impl_->upload_matrix(l.w_gate);
    d.w_up = impl_->upload_matrix(l.w_up);
    d.w_down = impl_->upload_matrix(l.w_down);
    d.bq = impl_->upload_vec(l.bq);
    d.bk = impl_->upload_vec(l.bk);
    d.bv = impl_->upload_vec(l.bv);
    d.bo = impl_->upload_vec(l.bo);
    d.b_gate = impl_->upload_vec(l.b_gate);
    d.b_up = impl_->upload_vec(l.b_up);
    d.b_down = impl_->upload_vec(l.b_down);
    d.attn_norm = impl_->upload_vec(l.attn_norm);
    d.attn_post_norm = impl_->upload_vec(l.attn_post_norm);
    d.ffn_norm = impl_->upload_vec(l.ffn_norm);
    d.ffn_post_norm = impl_->upload_vec(l.ffn_post_norm);
    d.q_norm = impl_->upload_vec(l.q_norm);
    d.k_norm = impl_->upload_vec(l.k_norm);
    impl_->layers.push_back(d);
  }
  impl_->output = impl_->upload_matrix(w.output);
  impl_->final_norm = impl_->upload_vec(w.final_norm);
  impl_->inv_freq = impl_->upload_vec(inv_freq);
  CUDA_OK(cudaStreamSynchronize(impl_->stream));  // synthetic matrices made, errors surfaced
  impl_->sample_device_memory();
}

GpuDecoder::~GpuDecoder() = default;

void GpuDecoder::forward(const int32_t* tokens, int64_t n, KVCache& cache, int64_t n_logits, float* logits) {
  const DecodeSegment segment{tokens, n, &cache, n_logits, logits};
  forward_batch(std::span<const DecodeSegment>(&segment, 1));
}

void GpuDecoder::forward_batch(std::span<const DecodeSegment> segments) {
  CUDA_OK(cudaSetDevice(impl_->device));
  switch (impl_->kv_type) {
    case KvType::F32:
      if (impl_->exact) impl_->forward_exact(segments);
      else impl_->forward_impl<float>(segments);
      break;
    case KvType::BF16: impl_->forward_impl<__nv_bfloat16>(segments); break;
    case KvType::Q8: impl_->forward_impl<int8_t>(segments); break;
  }
}

void GpuDecoder::copy_prefix(const KVCache& from, const KVCache& to, int64_t n) {
  CUDA_OK(cudaSetDevice(impl_->device));
  const auto src = impl_->caches.find(&from);
  check(src != impl_->caches.end(), "copy_prefix: the source KV cache has no positions on this GPU");
  const DevKv& s = src->second;
  const DevKv& d = impl_->kv_for(to);  // allocated on first use (std::map: s stays valid)
  // Layout [layer][position][kv_dim] (q8 scales: [layer][position][kv_dim / 32]): one strided copy
  // of n positions per layer, for each of K, V and their scales, on the decoder's stream (after the
  // steps that wrote the source).
  const size_t layers = static_cast<size_t>(impl_->model.config().n_layers);
  const auto copy = [&](const void* from_ptr, void* to_ptr, size_t bytes_per_layer) {
    const size_t row = bytes_per_layer / static_cast<size_t>(s.capacity), width = row * static_cast<size_t>(n);
    CUDA_OK(cudaMemcpy2DAsync(to_ptr, row * static_cast<size_t>(d.capacity), from_ptr, bytes_per_layer, width, layers,
                              cudaMemcpyDeviceToDevice, impl_->stream));
  };
  copy(s.k, d.k, s.values_bytes / layers);
  copy(s.v, d.v, s.values_bytes / layers);
  if (s.scale_bytes > 0) {
    copy(s.k_scale, d.k_scale, s.scale_bytes / layers);
    copy(s.v_scale, d.v_scale, s.scale_bytes / layers);
  }
}

int64_t GpuDecoder::prompt_chunk(std::span<const DecodeSegment> segments) {
  CUDA_OK(cudaSetDevice(impl_->device));
  return impl_->fit_prompt_chunk(segments);
}

void set_cuda_memory_limit(size_t bytes) { g_memory_limit = bytes; }
size_t cuda_memory_limit() { return g_memory_limit; }

size_t cuda_memory_used(int device) {
  CUDA_OK(cudaSetDevice(device));
  return device_used_now();
}

void GpuDecoder::release(const KVCache& cache) {
  const_cast<KVCache&>(cache).on_release = nullptr;
  impl_->release(cache);
}

GpuMemory GpuDecoder::memory() const {
  GpuMemory m;
  m.weights = impl_->mem.bytes[0];
  m.kv_cache = impl_->mem.bytes[1];
  m.workspace = impl_->mem.bytes[2];
  m.peak_allocated = impl_->mem.peak;
  m.device_used_peak = impl_->device_used_peak;
  m.device_total = impl_->device_total;
  m.device_used_at_start = impl_->device_used_at_start;
  return m;
}

int GpuDecoder::device() const { return impl_->device; }

int64_t GpuDecoder::prompt_gemm_tokens() const { return impl_->tensor_cores() ? Impl::kGemmMinTokens : 0; }

std::string GpuDecoder::prompt_matmuls() const {
  if (impl_->exact) return "exact numerics (one warp per output, no tensor cores)";
  const std::string batches = " for batches of " + std::to_string(Impl::kGemmMinTokens) + "+ tokens";
  if (impl_->blas.ready()) return impl_->blas.status() + batches;
  if (impl_->mma_fallback)
    return "tensor cores without cuBLAS (WMMA on weights dequantized in shared memory)" + batches + "; cuBLAS " +
           impl_->blas.status();
  return "integer kernels; cuBLAS " + impl_->blas.status();
}

}  // namespace bioquant
