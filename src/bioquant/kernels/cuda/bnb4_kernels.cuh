// bitsandbytes 4-bit (nf4, fp4): the codebook lookups by byte permutes, the one- and two-token
// decode kernels, and the passes of 2-16 tokens on the tensor cores.
// Part of the CUDA backend's single translation unit: included by gpu_decoder.cu (directly or through
// the files it includes) and nowhere else, so its definitions share that file's anonymous namespace.
#pragma once

#include <cstdint>

#include "bioquant/kernels/cuda/bnb4_permute_tables.h"
#include "bioquant/kernels/cuda/mma_tiles.cuh"
#include "bioquant/kernels/cuda/q4k_kernels.cuh"
#include "bioquant/kernels/cuda/qmatvec_kernels.cuh"

namespace bioquant {
namespace {

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

// The warp's first row's first block (lane < nb), loaded before the dependent-launch wait: the weights are never
// written by kernels. 0 and nothing loaded for a warp without rows.
__device__ __forceinline__ float bnb4_first_block(const QJobs& jobs, int64_t first, int lane, int nb, int64_t cols,
                                                  uint32_t (&next)[8]) {
  int64_t row = first;
  QJob job;
  if (first < jobs.total_rows && locate_row(jobs, row, job) && lane < nb)
    return bnb4_block<8>(job.w + row * job.row_bytes, cols, job.dq, lane, 0, next);
  return 0.0f;
}

// Block p's 32 code bytes into w and its scale (absmax / 16384). kPipelined: its words were loaded last time
// (next, next_absmax), and block p + 32's loads go out now.
template <bool kPipelined>
__device__ __forceinline__ float bnb4_take_block(const uint8_t* wr, int64_t cols, bool dq, int p, int nb, uint32_t (&w)[8],
                                                 uint32_t (&next)[8], float& next_absmax) {
  if constexpr (kPipelined) {
#pragma unroll
    for (int k = 0; k < 8; ++k) w[k] = next[k];
    const float scale = next_absmax * (1.0f / 16384.0f);
    if (p + 32 < nb) next_absmax = bnb4_block<8>(wr, cols, dq, p + 32, 0, next);
    return scale;
  } else {
    return bnb4_block<8>(wr, cols, dq, p, 0, w) * (1.0f / 16384.0f);
  }
}

// Each pair of activation bytes swapped, as the permuted codes' byte order wants.
__device__ __forceinline__ int4 swap_byte_pairs(int4 v) {
  return make_int4(static_cast<int>(__byte_perm(v.x, 0, 0x2301)), static_cast<int>(__byte_perm(v.y, 0, 0x2301)),
                   static_cast<int>(__byte_perm(v.z, 0, 0x2301)), static_cast<int>(__byte_perm(v.w, 0, 0x2301)));
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
  if constexpr (kPipelined) next_absmax = bnb4_first_block(jobs, first, lane, nb, cols, next);
  await_inputs();
  extern __shared__ int4 act_shared[];
  __shared__ uint32_t tables_shared[kBnb4PermuteWords * 32];  // a copy per lane: see below
  {
    const int4* src = reinterpret_cast<const int4*>(q);
    for (int c = threadIdx.x; c < cols / 16; c += blockDim.x) act_shared[act_chunk_slot(c)] = swap_byte_pairs(src[c]);
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
      const float scale = bnb4_take_block<kPipelined>(wr, cols, job.dq, p, nb, w, next, next_absmax);
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
  if constexpr (kPipelined) next_absmax = bnb4_first_block(jobs, first, lane, nb, cols, next);
  await_inputs();
  extern __shared__ int4 act_shared[];
  __shared__ uint32_t tables_shared[kBnb4PermuteWords * 32];
  const int64_t chunks = cols / 16, slots = static_cast<int64_t>(act_shared_bytes(cols) / 16);
  {
    const int4* src = reinterpret_cast<const int4*>(q);
    for (int64_t i = threadIdx.x; i < NT * chunks; i += blockDim.x) {
      const int64_t tk = i / chunks, c = i % chunks;
      act_shared[tk * slots + act_chunk_slot(static_cast<int>(c))] = swap_byte_pairs(src[tk * (nblk * 2) + c]);
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
      const float scale = bnb4_take_block<kPipelined>(wr, cols, job.dq, p, nb, w, next, next_absmax);
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

}  // namespace
}  // namespace bioquant
