// int8 (LLM.int8 rows), q8_0 and q4_0 passes of 2-16 tokens on the tensor cores.
// Part of the CUDA backend's single translation unit: included by gpu_decoder.cu (directly or through
// the files it includes) and nowhere else, so its definitions share that file's anonymous namespace.
#pragma once

#include <cstdint>

#include "bioquant/kernels/cuda/mma_tiles.cuh"
#include "bioquant/kernels/cuda/qmatvec_kernels.cuh"

namespace bioquant {
namespace {

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

}  // namespace
}  // namespace bioquant
