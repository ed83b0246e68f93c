// q6_k: the passes of 2-16 tokens on the tensor cores and the one-token decode kernel (the output
// matrix of the study's k-quant models).
// Part of the CUDA backend's single translation unit: included by gpu_decoder.cu (directly or through
// the files it includes) and nowhere else, so its definitions share that file's anonymous namespace.
#pragma once

#include <cstddef>
#include <cstdint>

#include "bioquant/kernels/cuda/mma_tiles.cuh"
#include "bioquant/kernels/cuda/qmatvec_kernels.cuh"

namespace bioquant {
namespace {

// 4 bytes at a 2-byte aligned address (q6_k blocks are 210 bytes): one word load where the caller knows it
// is 4-byte aligned, else two half-word loads.
template <bool kAligned>
__device__ __forceinline__ uint32_t word_b2(const uint8_t* p) {
  if constexpr (kAligned) return *reinterpret_cast<const uint32_t*>(p);
  const uint16_t* h = reinterpret_cast<const uint16_t*>(p);
  return static_cast<uint32_t>(h[0]) | (static_cast<uint32_t>(h[1]) << 16);
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

}  // namespace
}  // namespace bioquant
