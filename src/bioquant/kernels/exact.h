// Exact numerics (Decoder's `exact` mode): every rounding step of a forward pass is defined once,
// here, and compiled for both the CPU engine (kernels/cpu/exact_ops.cpp) and the CUDA backend, so
// the two compute the same floats bit for bit, and so the same greedy continuation in every format.
//
// The fast engines cannot promise that: their quantized matmuls quantize activations to int8, and a
// value that lands within float rounding of a quantization midpoint rounds one way or the other with
// the summation order, a step of 1/127 of its block's absmax. The rules here:
// - Only IEEE basic operations (+ - * /, sqrt, conversions), each rounded to nearest on its own, never
//   fused: device code spells each with its _rn intrinsic (which nvcc never contracts into an FMA),
//   and the host unit is compiled with -ffp-contract=off. exp, tanh, sin and cos are polynomials in
//   double built from those operations, not the platforms' libm.
// - Every sum has one order (canonical_sum): term u goes to lane u % 32, each lane adds its terms in
//   order, then the 32 lane sums are added in lane order: a warp's natural order on the GPU, a loop
//   over 32 partial sums on the CPU.
// - Quantized matmuls quantize the activations per 32 columns as the fast kernels do (quantize_block)
//   and take exact integer dot products; each 32-column block's float term has one formula per format
//   (block_term).
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "bioquant/core/host_device.h"
#include "bioquant/quant/quant.h"

#if !defined(__CUDA_ARCH__)
#include <cmath>
#endif

namespace bioquant::exact {

// ---- One rounding per operation (T: float or double) ----
#if defined(__CUDA_ARCH__)
#define BQ_EXACT_OP(name, op, f_rn, d_rn)                                  \
  template <class T>                                                     \
  BQ_HOST_DEVICE inline T name(T a, T b) {                               \
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>); \
    if constexpr (std::is_same_v<T, float>) return f_rn(a, b);           \
    else return d_rn(a, b);                                              \
  }
#else
#define BQ_EXACT_OP(name, op, f_rn, d_rn)                                  \
  template <class T>                                                     \
  BQ_HOST_DEVICE inline T name(T a, T b) {                               \
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>); \
    return a op b;                                                       \
  }
#endif
BQ_EXACT_OP(add, +, __fadd_rn, __dadd_rn)
BQ_EXACT_OP(sub, -, __fsub_rn, __dsub_rn)
BQ_EXACT_OP(mul, *, __fmul_rn, __dmul_rn)
BQ_EXACT_OP(div, /, __fdiv_rn, __ddiv_rn)
#undef BQ_EXACT_OP
BQ_HOST_DEVICE inline float sqrt_f(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}
BQ_HOST_DEVICE inline float to_float(double v) {
#if defined(__CUDA_ARCH__)
  return __double2float_rn(v);
#else
  return static_cast<float>(v);
#endif
}
BQ_HOST_DEVICE inline float to_float(int32_t v) {
#if defined(__CUDA_ARCH__)
  return __int2float_rn(v);
#else
  return static_cast<float>(v);
#endif
}
BQ_HOST_DEVICE inline float to_float(int64_t v) {
#if defined(__CUDA_ARCH__)
  return __ll2float_rn(static_cast<long long>(v));
#else
  return static_cast<float>(v);
#endif
}
// Round half to even to an integral double (the default rounding mode on both sides).
BQ_HOST_DEVICE inline double round_even(double v) {
#if defined(__CUDA_ARCH__)
  return rint(v);
#else
  return std::nearbyint(v);
#endif
}
BQ_HOST_DEVICE inline double scale2(double v, int e) {  // v * 2^e, exact for normal results
#if defined(__CUDA_ARCH__)
  return ldexp(v, e);
#else
  return std::ldexp(v, e);
#endif
}
BQ_HOST_DEVICE inline uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}
BQ_HOST_DEVICE inline float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}
BQ_HOST_DEVICE inline float abs_f(float v) { return bits_float(float_bits(v) & 0x7fffffffu); }

// ---- Stored values (exact conversions) ----
BQ_HOST_DEVICE inline uint16_t load_u16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }
BQ_HOST_DEVICE inline float load_f32(const uint8_t* p) {
  return bits_float(static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) |
                    (static_cast<uint32_t>(p[2]) << 16) | (static_cast<uint32_t>(p[3]) << 24));
}
BQ_HOST_DEVICE inline float bf16_value(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }
BQ_HOST_DEVICE inline float f16_value(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0) {  // zero or subnormal: m * 2^-24, exact
    const float v = mul(to_float(static_cast<int32_t>(m)), 5.9604644775390625e-08f);
    return bits_float(float_bits(v) | sign);
  }
  if (e == 31) return bits_float(sign | 0x7f800000u | (m << 13));
  return bits_float(sign | ((e + 112u) << 23) | (m << 13));
}

// ---- Elementary functions (double polynomials; only the operations above) ----
// exp(x) for |x| <= ~700: x = k ln2 + r, |r| <= ln2/2, Taylor to r^13 (error ~1e-17 relative).
BQ_HOST_DEVICE inline double exp_d(double x) {
  const double k = round_even(mul(x, 0x1.71547652b82fep+0));
  const double r = sub(sub(x, mul(k, 0x1.62e42fee00000p-1)), mul(k, 0x1.a39ef35793c76p-33));
  const double c[] = {0x1.6124613a86d09p-33, 0x1.1eed8eff8d898p-29, 0x1.ae64567f544e4p-26, 0x1.27e4fb7789f5cp-22,
                      0x1.71de3a556c734p-19, 0x1.a01a01a01a01ap-16, 0x1.a01a01a01a01ap-13, 0x1.6c16c16c16c17p-10,
                      0x1.1111111111111p-7,  0x1.5555555555555p-5,  0x1.5555555555555p-3,  0x1.0000000000000p-1,
                      1.0,                   1.0};  // 1/13! .. 1/2!, 1/1!, 1/0!
  double p = c[0];
  for (int i = 1; i < 14; ++i) p = add(mul(p, r), c[i]);
  return scale2(p, static_cast<int>(k));
}
// exp(y) - 1 without cancellation for |y| <= 1 (Taylor to y^20).
BQ_HOST_DEVICE inline double expm1_d(double y) {
  if (y > 1.0 || y < -1.0) return sub(exp_d(y), 1.0);
  double p = 0x1.e542ba4020225p-62;  // 1/20!
  const double c[] = {0x1.2f49b46814157p-57, 0x1.6827863b97d97p-53, 0x1.952c77030ad4ap-49, 0x1.ae7f3e733b81fp-45,
                      0x1.ae7f3e733b81fp-41, 0x1.93974a8c07c9dp-37, 0x1.6124613a86d09p-33, 0x1.1eed8eff8d898p-29,
                      0x1.ae64567f544e4p-26, 0x1.27e4fb7789f5cp-22, 0x1.71de3a556c734p-19, 0x1.a01a01a01a01ap-16,
                      0x1.a01a01a01a01ap-13, 0x1.6c16c16c16c17p-10, 0x1.1111111111111p-7,  0x1.5555555555555p-5,
                      0x1.5555555555555p-3,  0x1.0000000000000p-1,  1.0};  // 1/19! .. 1/1!
  for (int i = 0; i < 19; ++i) p = add(mul(p, y), c[i]);
  return mul(p, y);
}
BQ_HOST_DEVICE inline float exp_f(float x) {
  if (x != x) return x;
  if (x < -110.0f) return 0.0f;
  if (x > 100.0f) return bits_float(0x7f800000u);
  return to_float(exp_d(static_cast<double>(x)));
}
BQ_HOST_DEVICE inline float tanh_f(float x) {
  if (x != x) return x;
  const float ax = abs_f(x);
  float t = 1.0f;
  if (ax < 10.0f) {
    const double e = expm1_d(mul(2.0, static_cast<double>(ax)));
    t = to_float(div(e, add(e, 2.0)));
  }
  return x < 0.0f ? -t : t;
}
// sin and cos of a float angle: x = k pi/2 + r (three-part pi/2, exact products for |k| < 2^20),
// Taylor polynomials on |r| <= pi/4.
BQ_HOST_DEVICE inline void sin_cos(float angle, float* s_out, float* c_out) {
  const double x = static_cast<double>(angle);
  const double k = round_even(mul(x, 0x1.45f306dc9c883p-1));
  const double r = sub(sub(sub(x, mul(k, 0x1.921fb54400000p+0)), mul(k, 0x1.0b4611a600000p-34)), mul(k, 0x1.3198a2e000000p-69));
  const double r2 = mul(r, r);
  // sin r = r (1 - r^2/3! + ... - r^18/19!), cos r = 1 - r^2/2! + ... + r^18/18!
  const double sc[] = {-0x1.2f49b46814157p-57, 0x1.952c77030ad4ap-49, -0x1.ae7f3e733b81fp-41, 0x1.6124613a86d09p-33,
                       -0x1.ae64567f544e4p-26, 0x1.71de3a556c734p-19, -0x1.a01a01a01a01ap-13, 0x1.1111111111111p-7,
                       -0x1.5555555555555p-3,  1.0};
  const double cc[] = {-0x1.6827863b97d97p-53, 0x1.ae7f3e733b81fp-45, -0x1.93974a8c07c9dp-37, 0x1.1eed8eff8d898p-29,
                       -0x1.27e4fb7789f5cp-22, 0x1.a01a01a01a01ap-16, -0x1.6c16c16c16c17p-10, 0x1.5555555555555p-5,
                       -0x1.0000000000000p-1, 1.0};
  double ps = sc[0], pc = cc[0];
  for (int i = 1; i < 10; ++i) {
    ps = add(mul(ps, r2), sc[i]);
    pc = add(mul(pc, r2), cc[i]);
  }
  ps = mul(ps, r);
  const int q = static_cast<int>(static_cast<int64_t>(k) & 3);
  const double s = q == 0 ? ps : q == 1 ? pc : q == 2 ? -ps : -pc;
  const double c = q == 0 ? pc : q == 1 ? -ps : q == 2 ? -pc : ps;
  *s_out = to_float(s);
  *c_out = to_float(c);
}

// ---- Sums ----
// The canonical order on the host: lane partials (term u to lane u % 32, in order), then the lanes in order.
template <class T, class F>
inline T canonical_sum(int64_t n, F term) {
  T lane[32] = {};
  for (int64_t u = 0; u < n; ++u) lane[u % 32] = add(lane[u % 32], term(u));
  T s = T(0);
  for (int l = 0; l < 32; ++l) s = add(s, lane[l]);
  return s;
}

// ---- Activation quantization (qgemm_impl.h's scheme) ----
// Round half to even for |v| < 2^22: one float add and bit manipulation.
BQ_HOST_DEVICE inline int32_t round_half_even(float v) {
  return static_cast<int32_t>(float_bits(add(v, 12582912.0f)) & 0x007fffffu) - 0x00400000;
}
// n (<= 32) values into 32 int8 quants (zeros past n); returns the block's scale absmax / 127.
BQ_HOST_DEVICE inline float quantize_block(const float* x, int64_t n, int8_t* q) {
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float v = abs_f(x[i]);
    amax = v > amax ? v : amax;
  }
  const float d = div(amax, 127.0f);
  const float id = d != 0.0f ? div(1.0f, d) : 0.0f;
  for (int64_t i = 0; i < 32; ++i) q[i] = static_cast<int8_t>(i < n ? round_half_even(mul(x[i], id)) : 0);
  return d;
}

// ---- Weight blocks ----
// The integer levels of 32-column block b of a quantized row and the scales that turn its integer dot
// products into the block's term (block_term).
struct Levels {
  int32_t lv[32];
  float scale_lo = 0.0f, scale_hi = 0.0f;  // scale_hi != scale_lo only for q6_k (two 16-column sub-blocks)
  float min = 0.0f;                        // K-quant offset: term -= min * sum(qx)
  bool split = false, has_min = false;
};

BQ_HOST_DEVICE inline void kquant_scale_min(const uint8_t* q, int j, int32_t* sc, int32_t* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// nf4/fp4 block absmax (double quantization decoded).
BQ_HOST_DEVICE inline float bnb_absmax(const uint8_t* row, int64_t nb, int64_t bb, bool dq, const float* dynamic_map) {
  if (!dq) return load_f32(row + 36 * bb);
  const int64_t ngroups = (nb + kBnbNested - 1) / kBnbNested;
  const float offset = load_f32(row);
  const float nested = load_f32(row + 4 + 4 * (bb / kBnbNested));
  return add(mul(dynamic_map[row[4 + 4 * ngroups + 33 * bb]], nested), offset);
}

// book: the nf4/fp4 codebook in Q1.14 (qgemm_impl.h's bnb_codebook_i16); dynamic_map: bitsandbytes'
// 256-entry map (double quantization). Unused by the other formats.
BQ_HOST_DEVICE inline void decode_block(QuantType t, const uint8_t* row, int64_t cols, int64_t b, bool dq,
                                        const int16_t* book, const float* dynamic_map, Levels& o) {
  switch (t) {
    case QuantType::Q8_0: {
      const uint8_t* blk = row + 34 * b;
      o.scale_lo = f16_value(load_u16(blk));
      for (int i = 0; i < 32; ++i) o.lv[i] = static_cast<int8_t>(blk[2 + i]);
      return;
    }
    case QuantType::Q4_0: {
      const uint8_t* blk = row + 18 * b;
      o.scale_lo = f16_value(load_u16(blk));
      for (int i = 0; i < 16; ++i) {
        o.lv[i] = (blk[2 + i] & 0xF) - 8;
        o.lv[16 + i] = (blk[2 + i] >> 4) - 8;
      }
      return;
    }
    case QuantType::Q4_K:
    case QuantType::Q5_K: {
      const bool q5 = t == QuantType::Q5_K;
      const int j = static_cast<int>(b % 8);
      const uint8_t* blk = row + (q5 ? 176 : 144) * (b / 8);
      const float d = f16_value(load_u16(blk)), dmin = f16_value(load_u16(blk + 2));
      int32_t sc, m;
      kquant_scale_min(blk + 4, j, &sc, &m);
      const uint8_t* qs = blk + (q5 ? 48 : 16) + 32 * (j / 2);
      for (int l = 0; l < 32; ++l) {
        int32_t v = (j & 1) ? qs[l] >> 4 : qs[l] & 0xF;
        if (q5) v |= ((blk[16 + l] >> j) & 1) << 4;
        o.lv[l] = v;
      }
      o.scale_lo = mul(d, to_float(sc));
      o.min = mul(dmin, to_float(m));
      o.has_min = true;
      return;
    }
    case QuantType::Q6_K: {
      const int j = static_cast<int>(b % 8), h = j / 4, part = j % 4;
      const uint8_t* blk = row + 210 * (b / 8);
      const uint8_t* ql = blk + 64 * h + (part & 1) * 32;
      const uint8_t* qh = blk + 128 + 32 * h;
      for (int l = 0; l < 32; ++l) {
        const int32_t low = part < 2 ? ql[l] & 0xF : ql[l] >> 4;
        o.lv[l] = (low | (((qh[l] >> (2 * part)) & 3) << 4)) - 32;
      }
      const float d = f16_value(load_u16(blk + 208));
      const auto* scales = reinterpret_cast<const int8_t*>(blk + 192);
      o.scale_lo = mul(d, to_float(static_cast<int32_t>(scales[2 * j])));
      o.scale_hi = mul(d, to_float(static_cast<int32_t>(scales[2 * j + 1])));
      o.split = true;
      return;
    }
    case QuantType::INT8: {  // the row's absmax / 127 is applied to the whole sum (finish_row)
      const auto* q = reinterpret_cast<const int8_t*>(row + 4);
      for (int64_t i = 0; i < 32; ++i) o.lv[i] = 32 * b + i < cols ? q[32 * b + i] : 0;
      o.scale_lo = 1.0f;
      return;
    }
    case QuantType::NF4:
    case QuantType::FP4: {
      const int64_t nb = cols / kBnbBlock, bb = b / 2, h = b % 2;
      const uint8_t* codes = dq ? row + 4 + 4 * ((nb + kBnbNested - 1) / kBnbNested) + 33 * bb + 1 : row + 36 * bb + 4;
      for (int k = 0; k < 16; ++k) {  // element 2k in the high nibble
        const uint8_t c = codes[16 * h + k];
        o.lv[2 * k] = book[c >> 4];
        o.lv[2 * k + 1] = book[c & 0xF];
      }
      o.scale_lo = mul(bnb_absmax(row, nb, bb, dq, dynamic_map), 1.0f / 16384.0f);
      return;
    }
    default: return;
  }
}

// The float term of one 32-column block from its exact integer sums: lo and hi the level x quant dot
// products of its two 16-column halves, sum_q the sum of its 32 quants, dx their scale.
BQ_HOST_DEVICE inline float block_float(const Levels& w, int32_t lo, int32_t hi, int32_t sum_q, float dx) {
  float inner;
  if (w.split) {
    inner = add(mul(w.scale_lo, to_float(lo)), mul(w.scale_hi, to_float(hi)));
  } else {
    inner = mul(w.scale_lo, to_float(lo + hi));
  }
  if (w.has_min) inner = sub(inner, mul(w.min, to_float(sum_q)));
  return mul(dx, inner);
}

// The float term of one 32-column block: qx its activation quants, dx their scale.
BQ_HOST_DEVICE inline float block_term(const Levels& w, const int8_t* qx, float dx) {
  int32_t lo = 0, hi = 0, sum_q = 0;  // exact integers (separate loops: each vectorises on the CPU)
  for (int i = 0; i < 16; ++i) lo += w.lv[i] * qx[i];
  for (int i = 16; i < 32; ++i) hi += w.lv[i] * qx[i];
  for (int i = 0; i < 32; ++i) sum_q += qx[i];
  return block_float(w, lo, hi, sum_q, dx);
}

// The row's sum of block terms into its output (int8: times the row's absmax / 127).
BQ_HOST_DEVICE inline float finish_row(QuantType t, const uint8_t* row, float sum) {
  return t == QuantType::INT8 ? mul(sum, div(load_f32(row), 127.0f)) : sum;
}

// Element i of a plain (f32/f16/bf16) row.
BQ_HOST_DEVICE inline float plain_value(QuantType t, const uint8_t* row, int64_t i) {
  if (t == QuantType::F32) return load_f32(row + 4 * i);
  const uint16_t h = load_u16(row + 2 * i);
  return t == QuantType::BF16 ? bf16_value(h) : f16_value(h);
}

// ---- Elementwise steps ----
BQ_HOST_DEVICE inline float silu_mul(float a, float b) { return mul(div(a, add(1.0f, exp_f(-a))), b); }
BQ_HOST_DEVICE inline float gelu_tanh_mul(float x, float b) {
  const float inner = mul(0.7978845608028654f, add(x, mul(0.044715f, mul(mul(x, x), x))));
  return mul(mul(mul(0.5f, x), add(1.0f, tanh_f(inner))), b);
}
BQ_HOST_DEVICE inline float softcap(float x, float cap) { return mul(tanh_f(div(x, cap)), cap); }
// RMSNorm's scale from the row's sum of squares (in double, canonical order).
BQ_HOST_DEVICE inline float rms_scale(double sum_squares, int64_t n, float eps) {
  return div(1.0f, sqrt_f(add(to_float(div(sum_squares, static_cast<double>(n))), eps)));
}
// RoPE: rotates the pairs (i, i + rotary_dim / 2) of one head at angle pos * inv_freq[i].
BQ_HOST_DEVICE inline void rope_pair(float& x1, float& x2, float c, float s) {
  const float a = x1, b = x2;
  x1 = sub(mul(a, c), mul(b, s));
  x2 = add(mul(b, c), mul(a, s));
}

}  // namespace bioquant::exact
