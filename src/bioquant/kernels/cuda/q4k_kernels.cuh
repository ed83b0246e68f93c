// q4_k (and q5_k on the tensor cores): the one-token decode kernel, the two-token kernel, and the
// passes of 2-16 tokens on the tensor cores.
// Part of the CUDA backend's single translation unit: included by gpu_decoder.cu (directly or through
// the files it includes) and nowhere else, so its definitions share that file's anonymous namespace.
#pragma once

#include <cstddef>
#include <cstdint>

#include "bioquant/kernels/cuda/mma_tiles.cuh"
#include "bioquant/kernels/cuda/qmatvec_kernels.cuh"

namespace bioquant {
namespace {

// q4_k decode (one token): a lane takes the two 32-blocks that share one 32-byte run of qs (low
// and high nibbles), so every weight byte is loaded once; a warp takes R adjacent rows, so each
// activation load serves R rows (the activations, re-read by every row, otherwise load the L1 more
// than the weights do); dp4a dot products.

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

// One row's pair (weights wt, pair jp of its super-block) against the pair's activations (x0, x1: its two
// 32-blocks), their scales and sums, added into acc.
__device__ __forceinline__ void q4k_add_pair(const Q4kPairWeights& wt, int jp, const int (&x0)[8], const int (&x1)[8],
                                             float dx0, float dx1, float sx0, float sx1, float& acc) {
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
  acc += dx0 * (dd * sc0 * static_cast<float>(lo) - dmin * m0 * sx0);
  acc += dx1 * (dd * sc1 * static_cast<float>(hi) - dmin * m1 * sx1);
}

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
      q4k_add_pair(wt, jp, x0, x1, dx0, dx1, sx0, sx1, acc[r]);
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

// Rows whose pairs do not fill the lanes evenly (3584 columns: 56 pairs, so 24 lanes take two and 8 take
// one; 3072: 48, half the lanes one) leave lanes idle while the warp waits on its loads, and the matvec
// reads fewer bytes per warp: gate/up of a Gemma 2 shape at 2.86 TB/s and of a Phi-3-mini shape at 2.19,
// against 3.14 for the 8B shape's 64 pairs (H200, ncu, each launch alone). Here a warp takes R rows
// (those of one job) as one run of R x pairs units, unit u (row u / pairs, pair u % pairs) to lane u % 32:
// two rows of 48 pairs fill every lane (the launch's choice: see q4k_flat_fills). The activations in shared
// memory, the first kQ4kPreload units' weights loaded before the dependent-launch wait, as
// q4k_decode_kernel<1, true>.
template <int R>
__global__ void q4k_decode_flat_kernel(QJobs jobs, int64_t cols, const int8_t* q, const float* d, const int* s) {
  allow_dependents_in_last_wave();
  const int lane = threadIdx.x % 32;
  int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32 * R;  // the warp's first row
  const int pairs = static_cast<int>(cols / 64), units = R * pairs;
  QJob job;
  const bool have = locate_row(jobs, row, job);
  const uint8_t* w0 = have ? job.w + row * job.row_bytes : nullptr;
  const auto advance = [pairs](int& r, int& p) {  // the unit 32 on: same row or a later one
    p += 32;
    while (p >= pairs) {
      p -= pairs;
      ++r;
    }
  };
  int ru = lane / pairs, pu = lane % pairs;  // this lane's unit: its row among the R, and pair
  const auto next_unit = [&] { advance(ru, pu); };
  Q4kPairWeights pre[kQ4kPreload];
  {
    int r = ru, p = pu;
#pragma unroll
    for (int k = 0; k < kQ4kPreload; ++k) {
      if (have && lane + 32 * k < units) pre[k] = load_q4k_pair(w0 + r * job.row_bytes, p);
      advance(r, p);
    }
  }
  await_inputs();
  extern __shared__ int4 act_shared[];
  const int4* src = reinterpret_cast<const int4*>(q);
  for (int c = threadIdx.x; c < cols / 16; c += blockDim.x) act_shared[act_chunk_slot(c)] = src[c];
  __syncthreads();
  if (!have) return;
  float acc[R];
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r] = 0.0f;
  const auto unit = [&](const Q4kPairWeights& wt) {
    const int4* a = act_shared + act_chunk_slot(4 * pu);
    const int4 a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
    const int x0[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
    const int x1[8] = {a2.x, a2.y, a2.z, a2.w, a3.x, a3.y, a3.z, a3.w};
    const float2 dx = reinterpret_cast<const float2*>(d)[pu];  // blocks 2pu, 2pu + 1: one 8-byte load each
    const int2 sx = reinterpret_cast<const int2*>(s)[pu];
    float sum = 0.0f;
    q4k_add_pair(wt, pu & 3, x0, x1, dx.x, dx.y, static_cast<float>(sx.x), static_cast<float>(sx.y), sum);
#pragma unroll
    for (int r = 0; r < R; ++r)
      if (r == ru) acc[r] += sum;
  };
  int u = lane;
#pragma unroll
  for (int k = 0; k < kQ4kPreload; ++k, u += 32, next_unit())
    if (u < units) unit(pre[k]);
  for (; u < units; u += 32, next_unit()) unit(load_q4k_pair(w0 + ru * job.row_bytes, pu));
#pragma unroll
  for (int r = 0; r < R; ++r) store_row_sums<1>(&acc[r], 1, job.rows, row + r, lane, job.y);
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
// partial sums are added in warp order through shared memory (the same result every run). In the
// mma's k order (mma_tiles.cuh), lane t takes weights 8t..8t+7 of the sub-block (one 8-byte load of
// the 32-byte run whose low and high nibbles hold a pair of sub-blocks) and the same 8 activations.
//
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

}  // namespace
}  // namespace bioquant
