// Quantized matmuls of a few dozen tokens (short prompts, batched decode steps) on the tensor cores, with the
// weights dequantized in registers: no bf16 copy of the matrix is written and read back. Formats: q4_k (144
// bytes per 256 weights), nf4 / fp4 without double quantization (four 36-byte blocks per 256 weights: an f32
// absmax and 32 bytes of codes), bitsandbytes-style int8 (an f32 row absmax, then a byte per weight), q8_0
// (34-byte blocks of 32), q4_0 (18-byte blocks of 32), q5_k (176 bytes per 256), q6_k (210 bytes per 256)
// and nf4 / fp4 with double quantization (33-byte blocks after a row header):
// every quantized format.
// Part of the CUDA backend's single translation unit: included by gpu_decoder.cu (directly or through
// the files it includes) and nowhere else, so its definitions share that file's anonymous namespace.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>
#include <cstring>

#include "bioquant/kernels/cuda/block_decoders.cuh"
#include "bioquant/kernels/cuda/device_common.cuh"

namespace bioquant {
namespace {

// The prompt path (65+ tokens) dequantizes every matrix into bf16 tiles and hands them to cuBLAS: 14 GB written and
// read back per step for an 8B model whatever the step's length, ~11 ms on an H200, which a step of 32
// tokens (or 32 sequences' one token each) pays in full. This kernel reads the quantized bytes once and
// multiplies them as it turns them into bf16 weights.
//
// A block takes 128 rows (8 warps x 16) and up to 32 tokens (8 * NTILE; longer steps go in passes) over a
// range of 256-weight pieces of the rows ("super-blocks": gridDim.y ranges split the columns; their partial
// sums are added in range order by the block that finishes last, so every run gives the same result). Each
// super-block's 128 rows of quantized bytes and the tokens' 256 bf16 activations are copied into shared
// memory by cp.async, qgemm_stages(F) deep, so the loads of the next ones are in flight while one multiplies.
// mma.sync m16n8k16 (bf16 in, f32 sums): lane (g, t) holds rows g and g + 8 at weights 8t..8t+7 of each
// 32-weight sub-block; the order of k inside an mma is free when A and B agree, so the activations it pairs
// with are one 16-byte load of the same 8 positions.
//
// The weights are dequant_bf16_kernel's, bit for bit, so the two paths differ only in the order of the f32
// sums. q4_k: scale * level + min_term by one f32 fused multiply-add, rounded to bf16; lane t works out the
// scales of sub-blocks 2t and 2t + 1 of its two rows and hands them round the row's four lanes. nf4 / fp4:
// (absmax / 16384) * level, the Q1.14 level looked up as a float in a 16-entry table in shared memory (16
// banks: any pattern of lookups is one wavefront), indexed by byte offsets (code * 4) made four at a time.
// int8: (absmax / 127) * level. Its rows (4 + cols bytes) start 4-byte aligned, so a row's 256 bytes of a
// super-block are staged as the 17 aligned 16-byte pieces around them (the last one only up to the row's
// bytes) and read from their offset in the first piece. q8_0 and q4_0: d * level. q5_k: as q4_k, with the
// fifth bits. q6_k: (d * scale) * level; its super-blocks start 2-byte aligned, so each is staged as the 14
// pieces around it, as int8's rows are. nf4 / fp4 with double quantization: absmax = map[code] * group scale +
// offset (one fused multiply-add, as bnb4_block); their 132-byte super-blocks start at any byte, so they are
// staged as the 10 pieces around them, the map in shared memory.
constexpr int kQgemmRows = 128;
constexpr int kQgemmMaxTokens = 32;
constexpr int kQgemmMaxRanges = 8;  // column ranges per matrix (the last block's sums load them all at once)
constexpr size_t kQgemmArrivalBytes = 64 << 10;  // the blocks' arrival counts before the partial sums (16K blocks)
// A token's staged super-block: 256 bf16 and 64 bytes of padding, so the two token rows of a quarter
// warp's 16-byte loads fall in different banks.
constexpr int kQgemmStride = 256 + 32;
template <QuantType T>
__host__ __device__ constexpr bool qgemm_is(int f) { return f == static_cast<int>(T); }
// A row's bytes of a super-block: in the matrix, and staged in shared memory (int8: the 17 pieces around its
// 256; q6_k: the 14 around its 210; double-quantized nf4 / fp4 (dq): the 10 around its 132).
__host__ __device__ constexpr int qgemm_source_bytes(int f, bool dq = false) {
  return dq ? 132
         : qgemm_is<QuantType::INT8>(f) ? 256
         : qgemm_is<QuantType::Q8_0>(f) ? 272
         : qgemm_is<QuantType::Q6_K>(f) ? 210
         : qgemm_is<QuantType::Q5_K>(f) ? 176
                                        : 144;
}
__host__ __device__ constexpr int qgemm_row_bytes(int f, bool dq = false) {
  return dq ? 160 : qgemm_is<QuantType::INT8>(f) ? 272 : qgemm_is<QuantType::Q6_K>(f) ? 224 : qgemm_source_bytes(f);
}
// The formats with a double-quantized variant (qgemm_kernel's DQ).
__host__ __device__ constexpr bool qgemm_has_dq(int f) { return qgemm_is<QuantType::NF4>(f) || qgemm_is<QuantType::FP4>(f); }
// The formats whose super-blocks are staged as the aligned pieces around them, from their first byte.
__host__ __device__ constexpr bool qgemm_misaligned(int f, bool dq) {
  return dq || qgemm_is<QuantType::INT8>(f) || qgemm_is<QuantType::Q6_K>(f);
}
// Stages in flight: the wider formats' take more room, and two blocks per SM need two of them (int8: 3 x 52
// KB with 32 tokens).
__host__ __device__ constexpr int qgemm_stages(int f, bool dq = false) { return qgemm_row_bytes(f, dq) > 144 ? 2 : 3; }
// q8_0, q6_k, int8 and double-quantized nf4 / fp4 held to 128 registers (two blocks per SM): unbounded, ptxas
// takes 130-144 with 32 tokens (H200, 8B, held / unbounded: q8_0 pp32 4437 / 3944 tok/s, q4_k_m 32 sequences
// 4929 / 4734). 0: no minimum (the others take 94-128 unbounded; an explicit 1 let ptxas take ~127 in every variant).
__host__ __device__ constexpr int qgemm_min_blocks(int f, bool dq) {
  return dq || qgemm_is<QuantType::Q8_0>(f) || qgemm_is<QuantType::Q6_K>(f) || qgemm_is<QuantType::INT8>(f) ? 2 : 0;
}
__host__ __device__ constexpr size_t qgemm_stage_bytes(int f, int tokens, bool dq = false) {
  return static_cast<size_t>(kQgemmRows) * qgemm_row_bytes(f, dq) + static_cast<size_t>(tokens) * kQgemmStride * 2;
}
constexpr size_t qgemm_smem(int f, int tokens, bool dq = false) { return qgemm_stages(f, dq) * qgemm_stage_bytes(f, tokens, dq); }

// bf16 mma m16n8k16, accumulating into acc. Fragments (PTX ISA): lane (g, t) holds A's rows g (a0) and g + 8
// (a1) at k = 2t, 2t + 1, the same rows at k = 2t + 8, 2t + 9 (a2, a3), B's column g at those k (b0, b1), and C
// as the int8 mma's (rows g, g + 8 at columns 2t, 2t + 1); the lower half of a register holds the lower k.
__device__ __forceinline__ void mma_bf16_m16n8k16(float (&acc)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                  uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  (void)acc, (void)a0, (void)a1, (void)a2, (void)a3, (void)b0, (void)b1;  // the host pass
#endif
}

// The first `bytes` (0-16) of 16 from global into shared memory, the rest zeros (nothing past them read).
__device__ __forceinline__ void cp_async16_bytes(void* smem, const void* gmem, unsigned bytes) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(gmem), "r"(bytes) : "memory");
}

// A byte of u as a float: the byte put into the mantissa of 2^23, minus 2^23 (exact).
template <int E>
__device__ __forceinline__ float q4k_gemm_byte(uint32_t u) {
  return __int_as_float(static_cast<int>(__byte_perm(u, 0x4B000000u, 0x7440u | E))) - 8388608.0f;
}

// Sub-blocks 2jp and 2jp + 1 of a q4_k super-block header (d, dmin, scales): their scales d * sc and
// min_terms -dmin * m, as decode32_k45 has them.
__device__ __forceinline__ float4 q4k_gemm_scales(const uint4& head, int jp) {
  const uint32_t pair = kquant_scale_min_pair(head, jp);  // bytes sc, sc', m, m'
  const float d = half_lo(head.x), dmin = half_hi(head.x);
  return make_float4(d * q4k_gemm_byte<0>(pair), d * q4k_gemm_byte<1>(pair), -dmin * q4k_gemm_byte<2>(pair),
                     -dmin * q4k_gemm_byte<3>(pair));
}

// The four levels in nib's bytes (q4_k 0-15, q5_k 0-31) as bf16 weights scale * level + min_term (one f32
// fused multiply-add each, rounded, as dequant_bf16_kernel): pairs (0, 1) and (2, 3).
__device__ __forceinline__ uint2 q4k_gemm_weights(uint32_t nib, float scale, float min_term) {
  const __nv_bfloat162 lo = __floats2bfloat162_rn(__fmaf_rn(scale, q4k_gemm_byte<0>(nib), min_term),
                                                  __fmaf_rn(scale, q4k_gemm_byte<1>(nib), min_term));
  const __nv_bfloat162 hi = __floats2bfloat162_rn(__fmaf_rn(scale, q4k_gemm_byte<2>(nib), min_term),
                                                  __fmaf_rn(scale, q4k_gemm_byte<3>(nib), min_term));
  uint2 out;
  memcpy(&out.x, &lo, 4);
  memcpy(&out.y, &hi, 4);
  return out;
}

// nf4 / fp4: the bf16 pair (s * book[code of the first], s * book[code of the second]) of two codes' byte
// offsets in bytes E (first) of a and b, as dequant_bf16_kernel rounds them (f32 product, then bf16).
template <int E>
__device__ __forceinline__ uint32_t bnb4_gemm_pair(const float* book, uint32_t a, uint32_t b, float s) {
  const char* base = reinterpret_cast<const char*>(book);
  const float la = *reinterpret_cast<const float*>(base + __byte_perm(a, 0, 0x4440u | E));
  const float lb = *reinterpret_cast<const float*>(base + __byte_perm(b, 0, 0x4440u | E));
  const __nv_bfloat162 pair = __floats2bfloat162_rn(__fmaf_rn(s, la, 0.0f), __fmaf_rn(s, lb, 0.0f));
  uint32_t out;
  memcpy(&out, &pair, 4);
  return out;
}

// Weights 8t..8t+7 of a 32-weight half block from its code word c (bytes 4t..4t+3 of the half; in a byte
// the lower element has the HIGH nibble, as bitsandbytes stores it): weights 0-3 (first) and 4-7 (second).
__device__ __forceinline__ void bnb4_gemm_weights(const float* book, uint32_t c, float s, uint2& first, uint2& second) {
  const uint32_t hi = (c >> 2) & 0x3C3C3C3Cu, lo = (c << 2) & 0x3C3C3C3Cu;  // byte offsets of the even / odd elements
  first = make_uint2(bnb4_gemm_pair<0>(book, hi, lo, s), bnb4_gemm_pair<1>(book, hi, lo, s));
  second = make_uint2(bnb4_gemm_pair<2>(book, hi, lo, s), bnb4_gemm_pair<3>(book, hi, lo, s));
}

// The four bytes of v, less kBias, as bf16 weights s * level (f32 product, rounded, as dequant_bf16_kernel):
// pairs (0, 1) and (2, 3). A byte put into the mantissa of 2^23, minus 2^23 + kBias, is its level (exact).
// int8 (signed bytes): its bytes with the sign bit flipped, kBias 128; q6_k 32; q4_0 8.
template <int kBias>
__device__ __forceinline__ uint2 biased_gemm_weights(uint32_t v, float s) {
  const auto level = [v](uint32_t sel) {
    return __int_as_float(static_cast<int>(__byte_perm(v, 0x4B000000u, 0x7440u | sel))) - (8388608.0f + kBias);
  };
  const __nv_bfloat162 lo = __floats2bfloat162_rn(__fmaf_rn(s, level(0), 0.0f), __fmaf_rn(s, level(1), 0.0f));
  const __nv_bfloat162 hi = __floats2bfloat162_rn(__fmaf_rn(s, level(2), 0.0f), __fmaf_rn(s, level(3), 0.0f));
  uint2 out;
  memcpy(&out.x, &lo, 4);
  memcpy(&out.y, &hi, 4);
  return out;
}
__device__ __forceinline__ uint2 int8_gemm_weights(uint32_t u, float s) { return biased_gemm_weights<128>(u ^ 0x80808080u, s); }

// Up to three matrices of one input (q, k and v; gate and up) in one launch: blocks
// [first_block[i], first_block[i + 1]) take matrix i.
struct QgemmJobs {
  const uint8_t* w[3];
  size_t row_bytes[3];
  int64_t rows[3];
  float* y[3];
  int first_block[4];
};

// y_i[tok * rows_i + r] = sum_k w_i[r][k] x[tok][k] for rows r < rows_i and tokens tok < n_tokens (<= 8 * NTILE *
// gridDim.z: blocks z take tokens 8 NTILE z.. of them). x: [n_tokens][cols] bf16 (cols a multiple of 256, its rows
// 16-byte aligned). With gridDim.y > 1 (then gridDim.z == 1), partials holds gridDim.y x 8 * NTILE x (gridDim.x *
// 128) floats and arrivals gridDim.x zeros (left as zeros).
// Grid (the jobs' blocks of 128 rows, ranges, passes of 8 NTILE tokens), 256 threads, qgemm_smem(F, 8 * NTILE)
// bytes of dynamic shared memory. F: QuantType Q4_K, Q5_K, Q4_0, Q8_0, NF4 or FP4 (DQ: with double quantization),
// INT8 or Q6_K; w 16-byte aligned.
template <int F, int NTILE, bool DQ = false>
__global__ void __launch_bounds__(256, qgemm_min_blocks(F, DQ)) qgemm_kernel(QgemmJobs jobs, int64_t cols, const __nv_bfloat16* x,
                                                       int64_t n_tokens, float* partials, unsigned* arrivals) {
  constexpr int kTokens = 8 * NTILE;
  constexpr int kStageBytes = static_cast<int>(qgemm_stage_bytes(F, kTokens, DQ));
  constexpr int kStages = qgemm_stages(F, DQ), kRowBytes = qgemm_row_bytes(F, DQ), kPieces = kRowBytes / 16;
  constexpr int kSource = qgemm_source_bytes(F, DQ);
  constexpr bool kMisaligned = qgemm_misaligned(F, DQ);
  constexpr bool kInt8 = qgemm_is<QuantType::INT8>(F), kQ80 = qgemm_is<QuantType::Q8_0>(F),
                 kQ6k = qgemm_is<QuantType::Q6_K>(F), kQ40 = qgemm_is<QuantType::Q4_0>(F), kQ5k = qgemm_is<QuantType::Q5_K>(F);
  extern __shared__ uint4 qgemm_stage[];
  constexpr bool kBnb4 = qgemm_has_dq(F);
  __shared__ float book[16];         // nf4 / fp4: the Q1.14 levels as floats
  __shared__ float dmap[DQ ? 256 : 1];  // double quantization: the dynamic map of the absmax codes
  if constexpr (kBnb4) {
    if (threadIdx.x < 16)
      book[threadIdx.x] = static_cast<float>((F == static_cast<int>(QuantType::NF4) ? c_nf4_q14 : c_fp4_q14)[threadIdx.x]);
    if constexpr (DQ) dmap[threadIdx.x] = c_dynamic_map[threadIdx.x];
    // (the first __syncthreads of the loop below orders these before any lookup)
  }
  uint8_t* smem = reinterpret_cast<uint8_t*>(qgemm_stage);
  const int warp = static_cast<int>(threadIdx.x / 32), lane = static_cast<int>(threadIdx.x % 32);
  const int g = lane / 4, t = lane % 4;
  const int job = static_cast<int>(blockIdx.x) >= jobs.first_block[1] ? (static_cast<int>(blockIdx.x) >= jobs.first_block[2] ? 2 : 1) : 0;
  // Picked by selects, not indexed: a run-time index would copy the parameters into local memory.
  const auto pick = [job](auto a, auto b, auto c) { return job == 0 ? a : job == 1 ? b : c; };
  const uint8_t* w = pick(jobs.w[0], jobs.w[1], jobs.w[2]);
  const size_t row_bytes = pick(jobs.row_bytes[0], jobs.row_bytes[1], jobs.row_bytes[2]);
  const int64_t rows = pick(jobs.rows[0], jobs.rows[1], jobs.rows[2]), y_ld = rows;
  float* y = pick(jobs.y[0], jobs.y[1], jobs.y[2]);
  {  // this block's pass of the tokens (its rows of y: where they are written)
    const int64_t first_token = static_cast<int64_t>(kTokens) * blockIdx.z;
    x += first_token * cols;
    n_tokens = min(n_tokens - first_token, static_cast<int64_t>(kTokens));
  }
  const int64_t first_row =
      static_cast<int64_t>(static_cast<int>(blockIdx.x) - pick(jobs.first_block[0], jobs.first_block[1], jobs.first_block[2])) *
      kQgemmRows;
  const int64_t rg = first_row + 16 * warp + g, rg8 = rg + 8;
  // The partial sums' rows: this block's 128 after the blocks before it.
  const int64_t first_partial = static_cast<int64_t>(blockIdx.x) * kQgemmRows, pg = first_partial + 16 * warp + g;
  const int superblocks = static_cast<int>(cols / 256);
  const int ranges = static_cast<int>(gridDim.y), range = static_cast<int>(blockIdx.y);
  const int sb_begin = superblocks * range / ranges, sb_end = superblocks * (range + 1) / ranges;

  // Super-block sb into stage buffer b: the block's rows (kPieces pieces of 16 bytes each; zeros past the
  // matrix), then the tokens' activations (32 pieces each; zeros past n_tokens). This thread's pieces are
  // the same in every super-block: their sources (at super-block 0), sizes and places are worked out once.
  // kMisaligned: a row's super-block sb starts at data(row) + kSource * sb, `skip` = that address % 16 bytes
  // into its first piece; the last piece is cut after its kSource bytes.
  const int64_t first_byte = qgemm_is<QuantType::INT8>(F) ? 4 : DQ ? 4 + 4 * ((cols / 64 + 255) / 256) : 0;
  const auto data = [&](int64_t row) { return w + row * row_bytes + first_byte; };
  const auto skip = [](const uint8_t* p, int sb) {
    return static_cast<int>((reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(kSource) * sb) & 15u);
  };
  constexpr int kWeightPieces = (kQgemmRows * kPieces + 255) / 256, kActPieces = kTokens * 32 / 256;
  const uint8_t* wsrc[kWeightPieces];  // the piece's bytes at super-block 0 (kMisaligned: data(row) + 16 * piece)
  int wdst[kWeightPieces];             // -1: none
  uint64_t wpiece = 0;                 // 5 bits each: kMisaligned: the piece's index in its row; else its bytes
  unsigned win = 0;                    // the piece's row is in the matrix
#pragma unroll
  for (int k = 0; k < kWeightPieces; ++k) {
    const int i = static_cast<int>(threadIdx.x) + 256 * k, r = i / kPieces, piece = i % kPieces;
    const bool in = first_row + r < rows;
    wsrc[k] = data(in ? first_row + r : 0) + 16 * piece;
    wpiece |= static_cast<uint64_t>(kMisaligned ? piece : in ? 16 : 0) << (5 * k);
    win |= (in ? 1u : 0u) << k;
    wdst[k] = i < kQgemmRows * kPieces ? r * kRowBytes + 16 * piece : -1;
  }
  const __nv_bfloat16* xsrc[kActPieces];
  unsigned xvalid = 0;
#pragma unroll
  for (int k = 0; k < kActPieces; ++k) {
    const int i = static_cast<int>(threadIdx.x) + 256 * k, tok = i / 32, piece = i % 32;
    xvalid |= (tok < n_tokens ? 1u : 0u) << k;
    xsrc[k] = x + (tok < n_tokens ? tok : 0) * cols + 8 * piece;
  }
  const auto stage = [&](int b, int sb) {
    uint8_t* dst = smem + b * kStageBytes;
    const int64_t wofs = kSource * static_cast<int64_t>(sb), xofs = 256 * static_cast<int64_t>(sb);
#pragma unroll
    for (int k = 0; k < kWeightPieces; ++k) {
      const unsigned field = static_cast<unsigned>(wpiece >> (5 * k)) & 31u;
      if constexpr (kMisaligned) {
        const int mis = skip(wsrc[k], sb);
        const int bytes = (win >> k) & 1u ? min(max(mis + kSource - 16 * static_cast<int>(field), 0), 16) : 0;
        if (wdst[k] >= 0) cp_async16_bytes(dst + wdst[k], wsrc[k] + wofs - mis, static_cast<unsigned>(bytes));
      } else {
        if (wdst[k] >= 0) cp_async16_bytes(dst + wdst[k], wsrc[k] + wofs, field);
      }
    }
    uint8_t* xdst = dst + kQgemmRows * kRowBytes + static_cast<int>(threadIdx.x / 32) * kQgemmStride * 2 +
                    16 * static_cast<int>(threadIdx.x % 32);
#pragma unroll
    for (int k = 0; k < kActPieces; ++k)
      cp_async16_bytes(xdst + k * 8 * kQgemmStride * 2, xsrc[k] + xofs, ((xvalid >> k) & 1u) * 16);
  };

  await_inputs();
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (sb_begin + s < sb_end) stage(s, sb_begin + s);
    cp_async_commit();
  }
  float acc[NTILE][4] = {};
  // kMisaligned: rows g and g + 8's data (their skips); int8: their scales; double quantization: their
  // offsets and the group scales (zero past the matrix).
  const uint8_t* data_g = data(rg < rows ? rg : 0);
  const uint8_t* data_g8 = data(rg8 < rows ? rg8 : 0);
  float int8_scale = 0.0f, int8_scale8 = 0.0f;
  if constexpr (kInt8) {
    if (rg < rows) int8_scale = *reinterpret_cast<const float*>(w + rg * row_bytes) / 127.0f;
    if (rg8 < rows) int8_scale8 = *reinterpret_cast<const float*>(w + rg8 * row_bytes) / 127.0f;
  }
  float dq_offset = 0.0f, dq_offset8 = 0.0f, dq_group = 0.0f, dq_group8 = 0.0f;
  int dq_group_at = -1;  // the group whose scales dq_group / dq_group8 hold
  if constexpr (DQ) {
    if (rg < rows) dq_offset = f32_at(w + rg * row_bytes);
    if (rg8 < rows) dq_offset8 = f32_at(w + rg8 * row_bytes);
  }
  for (int sb = sb_begin, i = 0; sb < sb_end; ++sb, ++i) {
    cp_async_wait_group<kStages - 2>();
    __syncthreads();  // stage i is in; every warp is done with stage i - 1, whose buffer is refilled now
    if (sb + kStages - 1 < sb_end) stage((i + kStages - 1) % kStages, sb + kStages - 1);
    cp_async_commit();
    const uint8_t* buf = smem + (i % kStages) * kStageBytes;
    const uint8_t* wrow = buf + (16 * warp + g) * kRowBytes + (kMisaligned ? skip(data_g, sb) : 0);
    const uint8_t* wrow8 = buf + (16 * warp + g + 8) * kRowBytes + (kMisaligned ? skip(data_g8, sb) : 0);
    const __nv_bfloat16* xs = reinterpret_cast<const __nv_bfloat16*>(buf + kQgemmRows * kRowBytes) + 8 * t;
    const auto multiply = [&](int sub, const uint2& a_first, const uint2& a_second, const uint2& a8_first,
                              const uint2& a8_second) {
#pragma unroll
      for (int n = 0; n < NTILE; ++n) {
        const uint4 xv = *reinterpret_cast<const uint4*>(xs + (8 * n + g) * kQgemmStride + 32 * sub);
        mma_bf16_m16n8k16(acc[n], a_first.x, a8_first.x, a_first.y, a8_first.y, xv.x, xv.y);
        mma_bf16_m16n8k16(acc[n], a_second.x, a8_second.x, a_second.y, a8_second.y, xv.z, xv.w);
      }
    };
    if constexpr (kInt8) {
#pragma unroll
      for (int sub = 0; sub < 8; ++sub) {
        // Weights 8t..8t+7 of sub-block sub: 4-byte aligned in shared memory (the rows' skips are).
        const uint32_t* q = reinterpret_cast<const uint32_t*>(wrow + 32 * sub + 8 * t);
        const uint32_t* q8 = reinterpret_cast<const uint32_t*>(wrow8 + 32 * sub + 8 * t);
        multiply(sub, int8_gemm_weights(q[0], int8_scale), int8_gemm_weights(q[1], int8_scale),
                 int8_gemm_weights(q8[0], int8_scale8), int8_gemm_weights(q8[1], int8_scale8));
      }
    } else if constexpr (kQ80) {
#pragma unroll
      for (int blk = 0; blk < 8; ++blk) {
        const float d = __half2float(*reinterpret_cast<const __half*>(wrow + 34 * blk));
        const float d8 = __half2float(*reinterpret_cast<const __half*>(wrow8 + 34 * blk));
        uint32_t q[2], q8[2];  // levels 8t..8t+7 (2-byte aligned in even blocks)
        load_words<2>(wrow + 34 * blk + 2 + 8 * t, q);
        load_words<2>(wrow8 + 34 * blk + 2 + 8 * t, q8);
        multiply(blk, int8_gemm_weights(q[0], d), int8_gemm_weights(q[1], d), int8_gemm_weights(q8[0], d8),
                 int8_gemm_weights(q8[1], d8));
      }
    } else if constexpr (kQ40) {
      const int shift = 4 * (t / 2);  // weights 8t..8t+7: the low (t < 2) or high nibbles of bytes 8 (t % 2)..
#pragma unroll
      for (int blk = 0; blk < 8; ++blk) {
        const float d = __half2float(*reinterpret_cast<const __half*>(wrow + 18 * blk));
        const float d8 = __half2float(*reinterpret_cast<const __half*>(wrow8 + 18 * blk));
        uint32_t q[2], q8[2];
        load_words<2>(wrow + 18 * blk + 2 + 8 * (t % 2), q);
        load_words<2>(wrow8 + 18 * blk + 2 + 8 * (t % 2), q8);
        multiply(blk, biased_gemm_weights<8>((q[0] >> shift) & 0x0F0F0F0Fu, d),
                 biased_gemm_weights<8>((q[1] >> shift) & 0x0F0F0F0Fu, d),
                 biased_gemm_weights<8>((q8[0] >> shift) & 0x0F0F0F0Fu, d8),
                 biased_gemm_weights<8>((q8[1] >> shift) & 0x0F0F0F0Fu, d8));
      }
    } else if constexpr (kQ6k) {
      // Sub-block j = 4h + quad: low bits in the low (quad < 2) or high nibbles of ql bytes 64h + 32 (quad % 2)..,
      // high bits 2 quad.. of qh bytes 128 + 32h..; scales (int8) 2j for weights 0-15 (t < 2), 2j + 1 for 16-31.
      const float d = __half2float(*reinterpret_cast<const __half*>(wrow + 208));
      const float d8 = __half2float(*reinterpret_cast<const __half*>(wrow8 + 208));
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        uint32_t qh[2], qh8[2];
        load_words<2>(wrow + 128 + 32 * h + 8 * t, qh);
        load_words<2>(wrow8 + 128 + 32 * h + 8 * t, qh8);
#pragma unroll
        for (int odd = 0; odd < 2; ++odd) {
          uint32_t ql[2], ql8[2];
          load_words<2>(wrow + 64 * h + 32 * odd + 8 * t, ql);
          load_words<2>(wrow8 + 64 * h + 32 * odd + 8 * t, ql8);
#pragma unroll
          for (int high = 0; high < 2; ++high) {
            const int quad = odd + 2 * high, j = 4 * h + quad, sc = 192 + 2 * j + t / 2;
            const float s = d * static_cast<float>(static_cast<int8_t>(wrow[sc]));
            const float s8 = d8 * static_cast<float>(static_cast<int8_t>(wrow8[sc]));
            const auto values = [&](uint32_t lo, uint32_t hi) {
              return ((lo >> (4 * high)) & 0x0F0F0F0Fu) | (((hi >> (2 * quad)) & 0x03030303u) << 4);
            };
            multiply(j, biased_gemm_weights<32>(values(ql[0], qh[0]), s), biased_gemm_weights<32>(values(ql[1], qh[1]), s),
                     biased_gemm_weights<32>(values(ql8[0], qh8[0]), s8),
                     biased_gemm_weights<32>(values(ql8[1], qh8[1]), s8));
          }
        }
      }
    } else if constexpr (DQ) {
      // Blocks 4 sb..4 sb + 3 share a group of 256 blocks (64 super-blocks): its scales read when it changes.
      if (sb / 64 != dq_group_at) {
        dq_group_at = sb / 64;
        if (rg < rows) dq_group = f32_at(w + rg * row_bytes + 4 + 4 * dq_group_at);
        if (rg8 < rows) dq_group8 = f32_at(w + rg8 * row_bytes + 4 + 4 * dq_group_at);
      }
#pragma unroll
      for (int blk = 0; blk < 4; ++blk) {
        const float s = bnb4_dq_absmax(dmap[wrow[33 * blk]], dq_group, dq_offset) * (1.0f / 16384.0f);
        const float s8 = bnb4_dq_absmax(dmap[wrow8[33 * blk]], dq_group8, dq_offset8) * (1.0f / 16384.0f);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          uint32_t c, c8;  // code word t of half h (any alignment)
          load_words<1>(wrow + 33 * blk + 1 + 16 * h + 4 * t, &c);
          load_words<1>(wrow8 + 33 * blk + 1 + 16 * h + 4 * t, &c8);
          uint2 a_first, a_second, a8_first, a8_second;
          bnb4_gemm_weights(book, c, s, a_first, a_second);
          bnb4_gemm_weights(book, c8, s8, a8_first, a8_second);
          multiply(2 * blk + h, a_first, a_second, a8_first, a8_second);
        }
      }
    } else if constexpr (kBnb4) {
#pragma unroll
      for (int blk = 0; blk < 4; ++blk) {
        const float s = *reinterpret_cast<const float*>(wrow + 36 * blk) * (1.0f / 16384.0f);
        const float s8 = *reinterpret_cast<const float*>(wrow8 + 36 * blk) * (1.0f / 16384.0f);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int at = 36 * blk + 4 + 16 * h + 4 * t;
          uint2 a_first, a_second, a8_first, a8_second;
          bnb4_gemm_weights(book, *reinterpret_cast<const uint32_t*>(wrow + at), s, a_first, a_second);
          bnb4_gemm_weights(book, *reinterpret_cast<const uint32_t*>(wrow8 + at), s8, a8_first, a8_second);
          multiply(2 * blk + h, a_first, a_second, a8_first, a8_second);
        }
      }
    } else {
      const int src_lane = lane & ~3;  // lane t = 0 of this row pair; lane src_lane + jp worked out pair jp's scales
      const float4 my_g = q4k_gemm_scales(*reinterpret_cast<const uint4*>(wrow), t);
      const float4 my_g8 = q4k_gemm_scales(*reinterpret_cast<const uint4*>(wrow8), t);
      // q5_k: the fifth bits of weights 8t..8t+7, bit j of each byte for sub-block j (bytes 16-47).
      uint2 fifth = make_uint2(0, 0), fifth8 = make_uint2(0, 0);
      if constexpr (kQ5k) {
        fifth = *reinterpret_cast<const uint2*>(wrow + 16 + 8 * t);
        fifth8 = *reinterpret_cast<const uint2*>(wrow8 + 16 + 8 * t);
      }
      constexpr int kQs = kQ5k ? 48 : 16;  // the nibbles' first byte
#pragma unroll
      for (int jp = 0; jp < 4; ++jp) {
        const auto from = [&](float v) { return __shfl_sync(0xFFFFFFFFu, v, src_lane + jp); };
        const float sc_g[2] = {from(my_g.x), from(my_g.y)}, mt_g[2] = {from(my_g.z), from(my_g.w)};
        const float sc_g8[2] = {from(my_g8.x), from(my_g8.y)}, mt_g8[2] = {from(my_g8.z), from(my_g8.w)};
        const uint2 qg = *reinterpret_cast<const uint2*>(wrow + kQs + 32 * jp + 8 * t);
        const uint2 qg8 = *reinterpret_cast<const uint2*>(wrow8 + kQs + 32 * jp + 8 * t);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int shift = 4 * h;
          // Weights 8t..8t+3 (first) and 8t+4..8t+7 (second) of sub-block 2jp + h, rows g and g + 8.
          const int sub = 2 * jp + h;
          const auto level = [&](uint32_t q, uint32_t high) {
            return ((q >> shift) & 0x0F0F0F0Fu) | (((high >> sub) & 0x01010101u) << 4);
          };
          multiply(sub, q4k_gemm_weights(level(qg.x, fifth.x), sc_g[h], mt_g[h]),
                   q4k_gemm_weights(level(qg.y, fifth.y), sc_g[h], mt_g[h]),
                   q4k_gemm_weights(level(qg8.x, fifth8.x), sc_g8[h], mt_g8[h]),
                   q4k_gemm_weights(level(qg8.y, fifth8.y), sc_g8[h], mt_g8[h]));
        }
      }
    }
  }
  cp_async_wait_group<0>();

  // C's layout: rows g, g + 8 at tokens 8n + 2t, 8n + 2t + 1.
  if (ranges == 1) {
    y += static_cast<int64_t>(kTokens) * blockIdx.z * y_ld;  // (gridDim.z > 1 only with one range)
#pragma unroll
    for (int n = 0; n < NTILE; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t tok = 8 * n + 2 * t + e;
        if (tok >= n_tokens) continue;
        if (rg < rows) y[tok * y_ld + rg] = acc[n][e];
        if (rg8 < rows) y[tok * y_ld + rg8] = acc[n][2 + e];
      }
    }
    return;
  }
  const int64_t padded_rows = static_cast<int64_t>(gridDim.x) * kQgemmRows;
  float* mine = partials + static_cast<int64_t>(range) * kTokens * padded_rows;
#pragma unroll
  for (int n = 0; n < NTILE; ++n) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int64_t tok = 8 * n + 2 * t + e;
      mine[tok * padded_rows + pg] = acc[n][e];
      mine[tok * padded_rows + pg + 8] = acc[n][2 + e];
    }
  }
  __threadfence();
  __syncthreads();
  __shared__ bool last;
  if (threadIdx.x == 0) last = atomicAdd(&arrivals[blockIdx.x], 1u) == static_cast<unsigned>(ranges - 1);
  __syncthreads();
  if (!last) return;
  __threadfence();
  // The block's 128 rows x n_tokens sums, 4 rows per thread and two such at a time: each range's float4 of
  // both loaded before any is added (one wait on the L2, not one per range), then added in range order.
  const int64_t range_stride = static_cast<int64_t>(kTokens) * padded_rows / 4;  // in float4
  const float4* src = reinterpret_cast<const float4*>(partials + first_partial);
  const int quads = kQgemmRows / 4 * static_cast<int>(n_tokens);
  for (int i0 = static_cast<int>(threadIdx.x); i0 < quads; i0 += 2 * 256) {
    float4 p[2][kQgemmMaxRanges];
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int i = i0 + 256 * k;
      const int64_t at = static_cast<int64_t>(i / 32) * padded_rows / 4 + i % 32;
#pragma unroll
      for (int r = 0; r < kQgemmMaxRanges; ++r)
        if (i < quads && r < ranges) p[k][r] = __ldcg(src + at + r * range_stride);
    }
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int i = i0 + 256 * k;
      if (i >= quads) continue;
      float4 v = p[k][0];
#pragma unroll
      for (int r = 1; r < kQgemmMaxRanges; ++r) {
        if (r >= ranges) break;
        v.x += p[k][r].x;
        v.y += p[k][r].y;
        v.z += p[k][r].z;
        v.w += p[k][r].w;
      }
      const int64_t tok = i / 32, row = first_row + 4 * (i % 32);
      const float out[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (row + e < rows) y[tok * y_ld + row + e] = out[e];
    }
  }
  if (threadIdx.x == 0) arrivals[blockIdx.x] = 0u;
}

}  // namespace
}  // namespace bioquant
