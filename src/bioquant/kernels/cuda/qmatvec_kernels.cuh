// Quantized matmuls, the common part: activations quantized per 32 columns, the jobs a launch
// covers, the generic dp4a kernel of every format (qmatvec_kernel / qmatmul_kernel), and the
// helpers the per-format kernels share (the activations' shared-memory layout, integer-to-float).
// Part of the CUDA backend's single translation unit: included by gpu_decoder.cu (directly or through
// the files it includes) and nowhere else, so its definitions share that file's anonymous namespace.
#pragma once

#include <cstddef>
#include <cstdint>

#include "bioquant/kernels/cuda/block_decoders.cuh"
#include "bioquant/kernels/cuda/device_common.cuh"

namespace bioquant {
namespace {

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

}  // namespace
}  // namespace bioquant
