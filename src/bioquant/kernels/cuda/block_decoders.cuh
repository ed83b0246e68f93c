// Block decoders: the 32 integer levels and scales of one activation block of a quantized row, per
// format (the generic kernels' view of every format).
// Part of the CUDA backend's single translation unit: included by gpu_decoder.cu (directly or through
// the files it includes) and nowhere else, so its definitions share that file's anonymous namespace.
#pragma once

#include <cstddef>
#include <cstdint>

#include "bioquant/kernels/cuda/device_common.cuh"
#include "bioquant/kernels/cuda/gpu_memory_plan.h"
#include "bioquant/quant/quant.h"

namespace bioquant {
namespace {

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

// A double-quantized block's absmax: its code's map value times its group's scale, plus the row's offset (one
// fused multiply-add, the same in every kernel).
__device__ __forceinline__ float bnb4_dq_absmax(float code_value, float group_scale, float offset) {
  return __fmaf_rn(code_value, group_scale, offset);
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
  return bnb4_dq_absmax(c_dynamic_map[p[0]], f32_at(row + 4 + 4 * (blk / 256)), f32_at(row));
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

}  // namespace
}  // namespace bioquant
