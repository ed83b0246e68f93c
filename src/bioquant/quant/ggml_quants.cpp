// ggml formats (q8_0, q4_0, q4_k, q5_k, q6_k): scalar reference quantizers and dequantizers; and the
// GGUF formats held in a wider one on load (q5_0, q3_k: ggml_widening).
//
// Byte layouts are ggml's (formats.md §2). The quantizers follow the algorithms of llama.cpp's
// reference quantizers (ggml-quants.c, quantize_row_*_ref, no importance matrix):
//   q8_0  d = absmax/127, q = roundf(x/d) (half away from zero)
//   q4_0  d = max/-8 where max is the signed value of largest magnitude, q = min(15, trunc(x/d + 8.5))
//   q4_k  per 32: weighted least-squares search for (scale, min) over 21 candidate inverse scales
//         ("make_qkx2_quants", rmin -1, step 0.1, weights sqrt(mean x^2) + |x|), scales and mins
//         to 6 bits against the super-block maxima, then requantize with the stored values
//   q5_k  the same with 31 levels (rmin -0.5, step 0.1, 16 candidates)
//   q6_k  per 16: "make_qx_quants" (signed, 32 levels, weights x^2, 19 candidate scales), the
//         16 scales to int8 against the largest, then requantize
// so the error (and, bit for bit in all but rare float-association ties, the bytes) match llama.cpp.
#include <cmath>
#include <cstring>

#include "bioquant/core/error.h"
#include "bioquant/core/half.h"
#include "bioquant/quant/quant.h"

namespace bioquant {
namespace {

constexpr float kGroupMaxEps = 1e-15f;

// Round to nearest, ties to even, for |v| < 2^22 (llama.cpp's nearest_int trick).
int nearest_int(float v) {
  const float shifted = v + 12582912.0f;
  int32_t bits;
  std::memcpy(&bits, &shifted, sizeof bits);
  return (bits & 0x007fffff) - 0x00400000;
}

int clampi(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }

// ---- q8_0 ----
void quantize_q8_0(const float* x, int64_t cols, BlockQ8_0* y) {
  for (int64_t b = 0; b < cols / kQK; ++b, x += kQK) {
    float amax = 0.0f;
    for (int j = 0; j < kQK; ++j) amax = std::fmax(amax, std::fabs(x[j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    y[b].d = f32_to_f16(d);
    for (int j = 0; j < kQK; ++j) y[b].qs[j] = static_cast<int8_t>(std::roundf(x[j] * id));
  }
}
void dequantize_q8_0(const BlockQ8_0* in, int64_t cols, float* y) {
  for (int64_t b = 0; b < cols / kQK; ++b) {
    const float d = f16_to_f32(in[b].d);
    for (int j = 0; j < kQK; ++j) *y++ = static_cast<float>(in[b].qs[j]) * d;
  }
}

// ---- q4_0 ----
void quantize_q4_0(const float* x, int64_t cols, BlockQ4_0* y) {
  for (int64_t b = 0; b < cols / kQK; ++b, x += kQK) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < kQK; ++j) {
      if (amax < std::fabs(x[j])) {
        amax = std::fabs(x[j]);
        max = x[j];
      }
    }
    const float d = max / -8.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    y[b].d = f32_to_f16(d);
    for (int j = 0; j < 16; ++j) {
      // x*id lies in [-8, 8] (the extreme value maps to -8), so +8.5 is positive and the cast floors.
      const int q0 = static_cast<int>(x[j] * id + 8.5f);
      const int q1 = static_cast<int>(x[j + 16] * id + 8.5f);
      y[b].qs[j] = static_cast<uint8_t>((q0 < 15 ? q0 : 15) | (q1 < 15 ? q1 : 15) << 4);
    }
  }
}
void dequantize_q4_0(const BlockQ4_0* in, int64_t cols, float* y) {
  for (int64_t b = 0; b < cols / kQK; ++b, y += kQK) {
    const float d = f16_to_f32(in[b].d);
    for (int j = 0; j < 16; ++j) {
      y[j] = static_cast<float>((in[b].qs[j] & 0x0F) - 8) * d;
      y[j + 16] = static_cast<float>((in[b].qs[j] >> 4) - 8) * d;
    }
  }
}

// ---- K-quant helpers ----

// Fits x ~ scale * L - min (L in 0..nmax, min >= 0) minimising sum w (scale L - min - x)^2 over
// candidate inverse scales (nmax + rmin + rdelta*is) / (max - min), is = 0..nstep; each candidate's
// (scale, min) is the weighted least-squares solution for its rounding. Returns scale; *the_min = min.
float fit_scale_min(int n, int nmax, const float* x, const float* weights, uint8_t* L, float* the_min, float rmin,
                    float rdelta, int nstep) {
  float min = x[0], max = x[0];
  float sum_w = weights[0];
  float sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    if (x[i] < min) min = x[i];
    if (x[i] > max) max = x[i];
    const float w = weights[i];
    sum_w += w;
    sum_x += w * x[i];
  }
  if (min > 0) min = 0;
  if (max == min) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    *the_min = -min;
    return 0.0f;
  }
  float iscale = static_cast<float>(nmax) / (max - min);
  float scale = 1 / iscale;
  float best_error = 0;
  for (int i = 0; i < n; ++i) {
    const int l = nearest_int(iscale * (x[i] - min));
    L[i] = static_cast<uint8_t>(clampi(l, 0, nmax));
    const float diff = scale * L[i] + min - x[i];
    best_error += weights[i] * (diff * diff);
  }
  uint8_t Laux[32];
  for (int is = 0; is <= nstep; ++is) {
    iscale = (rmin + rdelta * static_cast<float>(is) + static_cast<float>(nmax)) / (max - min);
    float sum_l = 0, sum_l2 = 0, sum_xl = 0;
    for (int i = 0; i < n; ++i) {
      const int l = clampi(nearest_int(iscale * (x[i] - min)), 0, nmax);
      Laux[i] = static_cast<uint8_t>(l);
      const float w = weights[i];
      sum_l += w * static_cast<float>(l);
      sum_l2 += w * static_cast<float>(l) * static_cast<float>(l);
      sum_xl += w * static_cast<float>(l) * x[i];
    }
    const float D = sum_w * sum_l2 - sum_l * sum_l;
    if (D > 0) {
      float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
      float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
      if (this_min > 0) {
        this_min = 0;
        this_scale = sum_xl / sum_l2;
      }
      float err = 0;
      for (int i = 0; i < n; ++i) {
        const float diff = this_scale * Laux[i] + this_min - x[i];
        err += weights[i] * (diff * diff);
      }
      if (err < best_error) {
        for (int i = 0; i < n; ++i) L[i] = Laux[i];
        best_error = err;
        scale = this_scale;
        min = this_min;
      }
    }
  }
  *the_min = -min;
  return scale;
}

// Signed symmetric fit x ~ scale * (L - nmax), L - nmax in [-nmax, nmax-1], weights x^2, searching
// 19 inverse scales -(nmax + 0.1 is)/max around the absmax one. Returns scale (may be negative).
float fit_scale_signed(int n, int nmax, const float* x, int8_t* L) {
  float max = 0, amax = 0;
  for (int i = 0; i < n; ++i) {
    const float ax = std::fabs(x[i]);
    if (ax > amax) {
      amax = ax;
      max = x[i];
    }
  }
  if (amax < kGroupMaxEps) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    return 0.0f;
  }
  float iscale = -static_cast<float>(nmax) / max;
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    const int l = clampi(nearest_int(iscale * x[i]), -nmax, nmax - 1);
    L[i] = static_cast<int8_t>(l + nmax);
    const float w = x[i] * x[i];
    sumlx += w * x[i] * static_cast<float>(l);
    suml2 += w * static_cast<float>(l) * static_cast<float>(l);
  }
  float scale = suml2 != 0.0f ? sumlx / suml2 : 0.0f;
  float best = scale * sumlx;
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    iscale = -(static_cast<float>(nmax) + 0.1f * static_cast<float>(is)) / max;
    sumlx = suml2 = 0;
    for (int i = 0; i < n; ++i) {
      const int l = clampi(nearest_int(iscale * x[i]), -nmax, nmax - 1);
      const float w = x[i] * x[i];
      sumlx += w * x[i] * static_cast<float>(l);
      suml2 += w * static_cast<float>(l) * static_cast<float>(l);
    }
    if (suml2 > 0 && sumlx * sumlx > best * suml2) {
      for (int i = 0; i < n; ++i) L[i] = static_cast<int8_t>(nmax + clampi(nearest_int(iscale * x[i]), -nmax, nmax - 1));
      scale = sumlx / suml2;
      best = scale * sumlx;
    }
  }
  return scale;
}

// Packs 6-bit scale ls and min lm of sub-block j into scales[12] (formats.md §2, Q4_K).
void pack_scale_min(uint8_t* scales, int j, uint8_t ls, uint8_t lm) {
  if (j < 4) {
    scales[j] = ls;
    scales[j + 4] = lm;
  } else {
    scales[j + 4] = static_cast<uint8_t>((ls & 0xF) | ((lm & 0xF) << 4));
    scales[j - 4] |= static_cast<uint8_t>((ls >> 4) << 6);
    scales[j] |= static_cast<uint8_t>((lm >> 4) << 6);
  }
}

// Shared by q4_k (nmax 15) and q5_k (nmax 31): fills d, dmin, scales and the levels L[256].
template <class Block>
void quantize_kquant_scales(const float* x, Block* y, int nmax, float rmin, int nstep, uint8_t* L) {
  float mins[8], scales[8], weights[32];
  float max_scale = 0, max_min = 0;
  for (int j = 0; j < 8; ++j) {
    const float* xs = x + 32 * j;
    float sum_x2 = 0;
    for (int l = 0; l < 32; ++l) sum_x2 += xs[l] * xs[l];
    const float av_x = std::sqrt(sum_x2 / 32);
    for (int l = 0; l < 32; ++l) weights[l] = av_x + std::fabs(xs[l]);
    scales[j] = fit_scale_min(32, nmax, xs, weights, L + 32 * j, &mins[j], rmin, 0.1f, nstep);
    if (scales[j] > max_scale) max_scale = scales[j];
    if (mins[j] > max_min) max_min = mins[j];
  }
  const float inv_scale = max_scale > 0 ? 63.0f / max_scale : 0.0f;
  const float inv_min = max_min > 0 ? 63.0f / max_min : 0.0f;
  std::memset(y->scales, 0, sizeof y->scales);
  for (int j = 0; j < 8; ++j) {
    // nearest_int of a non-negative value <= 63 (+rounding), stored as uint8 like llama.cpp.
    uint8_t ls = static_cast<uint8_t>(nearest_int(inv_scale * scales[j]));
    uint8_t lm = static_cast<uint8_t>(nearest_int(inv_min * mins[j]));
    ls = ls < 63 ? ls : 63;
    lm = lm < 63 ? lm : 63;
    pack_scale_min(y->scales, j, ls, lm);
  }
  y->d = f32_to_f16(max_scale / 63.0f);
  y->dmin = f32_to_f16(max_min / 63.0f);
  // Requantize against the stored (rounded) scales and mins.
  for (int j = 0; j < 8; ++j) {
    uint8_t sc, m;
    kquant_scale_min(y->scales, j, &sc, &m);
    const float d = f16_to_f32(y->d) * sc;
    if (d == 0.0f) continue;
    const float dm = f16_to_f32(y->dmin) * m;
    for (int i = 0; i < 32; ++i) L[32 * j + i] = static_cast<uint8_t>(clampi(nearest_int((x[32 * j + i] + dm) / d), 0, nmax));
  }
}

void quantize_q4_k(const float* x, int64_t cols, BlockQ4_K* y) {
  uint8_t L[256];
  for (int64_t b = 0; b < cols / kQKK; ++b, x += kQKK) {
    quantize_kquant_scales(x, &y[b], 15, -1.0f, 20, L);
    uint8_t* q = y[b].qs;
    for (int j = 0; j < 256; j += 64, q += 32) {
      for (int l = 0; l < 32; ++l) q[l] = static_cast<uint8_t>(L[j + l] | (L[j + l + 32] << 4));
    }
  }
}

void dequantize_q4_k(const BlockQ4_K* in, int64_t cols, float* y) {
  for (int64_t b = 0; b < cols / kQKK; ++b) {
    const float d = f16_to_f32(in[b].d), dmin = f16_to_f32(in[b].dmin);
    const uint8_t* q = in[b].qs;
    for (int g = 0; g < 4; ++g, q += 32) {
      uint8_t sc, m;
      kquant_scale_min(in[b].scales, 2 * g, &sc, &m);
      const float d1 = d * sc, m1 = dmin * m;
      kquant_scale_min(in[b].scales, 2 * g + 1, &sc, &m);
      const float d2 = d * sc, m2 = dmin * m;
      for (int l = 0; l < 32; ++l) *y++ = d1 * static_cast<float>(q[l] & 0xF) - m1;
      for (int l = 0; l < 32; ++l) *y++ = d2 * static_cast<float>(q[l] >> 4) - m2;
    }
  }
}

void quantize_q5_k(const float* x, int64_t cols, BlockQ5_K* y) {
  uint8_t L[256];
  for (int64_t b = 0; b < cols / kQKK; ++b, x += kQKK) {
    quantize_kquant_scales(x, &y[b], 31, -0.5f, 15, L);
    uint8_t* qh = y[b].qh;
    uint8_t* ql = y[b].qs;
    std::memset(qh, 0, 32);
    uint8_t m1 = 1, m2 = 2;
    for (int n = 0; n < 256; n += 64, ql += 32) {
      for (int j = 0; j < 32; ++j) {
        int l1 = L[n + j], l2 = L[n + j + 32];
        if (l1 > 15) {
          l1 -= 16;
          qh[j] |= m1;
        }
        if (l2 > 15) {
          l2 -= 16;
          qh[j] |= m2;
        }
        ql[j] = static_cast<uint8_t>(l1 | (l2 << 4));
      }
      m1 = static_cast<uint8_t>(m1 << 2);
      m2 = static_cast<uint8_t>(m2 << 2);
    }
  }
}

void dequantize_q5_k(const BlockQ5_K* in, int64_t cols, float* y) {
  for (int64_t b = 0; b < cols / kQKK; ++b) {
    const float d = f16_to_f32(in[b].d), dmin = f16_to_f32(in[b].dmin);
    const uint8_t* ql = in[b].qs;
    const uint8_t* qh = in[b].qh;
    for (int g = 0; g < 4; ++g, ql += 32) {
      uint8_t sc, m;
      kquant_scale_min(in[b].scales, 2 * g, &sc, &m);
      const float d1 = d * sc, m1 = dmin * m;
      kquant_scale_min(in[b].scales, 2 * g + 1, &sc, &m);
      const float d2 = d * sc, m2 = dmin * m;
      const uint8_t u1 = static_cast<uint8_t>(1u << (2 * g)), u2 = static_cast<uint8_t>(2u << (2 * g));
      for (int l = 0; l < 32; ++l) *y++ = d1 * static_cast<float>((ql[l] & 0xF) + ((qh[l] & u1) ? 16 : 0)) - m1;
      for (int l = 0; l < 32; ++l) *y++ = d2 * static_cast<float>((ql[l] >> 4) + ((qh[l] & u2) ? 16 : 0)) - m2;
    }
  }
}

// Packs 256 levels 0..63 (the value's q + 32) into a Q6_K block's ql and qh.
void pack_q6_k_levels(const int8_t* L, BlockQ6_K& blk) {
  uint8_t* ql = blk.ql;
  uint8_t* qh = blk.qh;
  for (int j = 0; j < 256; j += 128, ql += 64, qh += 32) {
    for (int l = 0; l < 32; ++l) {
      const int q1 = L[j + l], q2 = L[j + l + 32], q3 = L[j + l + 64], q4 = L[j + l + 96];
      ql[l] = static_cast<uint8_t>((q1 & 0xF) | ((q3 & 0xF) << 4));
      ql[l + 32] = static_cast<uint8_t>((q2 & 0xF) | ((q4 & 0xF) << 4));
      qh[l] = static_cast<uint8_t>((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6));
    }
  }
}

void quantize_q6_k(const float* x, int64_t cols, BlockQ6_K* y) {
  int8_t L[256];
  float scales[16];
  for (int64_t b = 0; b < cols / kQKK; ++b, x += kQKK) {
    float max_scale = 0, max_abs_scale = 0;
    for (int ib = 0; ib < 16; ++ib) {
      scales[ib] = fit_scale_signed(16, 32, x + 16 * ib, L + 16 * ib);
      if (std::fabs(scales[ib]) > max_abs_scale) {
        max_abs_scale = std::fabs(scales[ib]);
        max_scale = scales[ib];
      }
    }
    BlockQ6_K& blk = y[b];
    if (max_abs_scale < kGroupMaxEps) {
      std::memset(&blk, 0, sizeof blk);
      continue;
    }
    const float iscale = -128.0f / max_scale;
    blk.d = f32_to_f16(1 / iscale);
    for (int ib = 0; ib < 16; ++ib) {
      const int s = nearest_int(iscale * scales[ib]);
      blk.scales[ib] = static_cast<int8_t>(s < 127 ? s : 127);
    }
    for (int j = 0; j < 16; ++j) {
      const float d = f16_to_f32(blk.d) * static_cast<float>(blk.scales[j]);
      if (d == 0.0f) continue;
      for (int i = 0; i < 16; ++i) L[16 * j + i] = static_cast<int8_t>(clampi(nearest_int(x[16 * j + i] / d), -32, 31) + 32);
    }
    pack_q6_k_levels(L, blk);
  }
}

void dequantize_q6_k(const BlockQ6_K* in, int64_t cols, float* y) {
  for (int64_t b = 0; b < cols / kQKK; ++b) {
    const float d = f16_to_f32(in[b].d);
    const uint8_t* ql = in[b].ql;
    const uint8_t* qh = in[b].qh;
    const int8_t* sc = in[b].scales;
    for (int half = 0; half < 2; ++half, y += 128, ql += 64, qh += 32, sc += 8) {
      for (int l = 0; l < 32; ++l) {
        const int is = l / 16;
        const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
        const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
        const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
        const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
        y[l] = d * static_cast<float>(sc[is]) * static_cast<float>(q1);
        y[l + 32] = d * static_cast<float>(sc[is + 2]) * static_cast<float>(q2);
        y[l + 64] = d * static_cast<float>(sc[is + 4]) * static_cast<float>(q3);
        y[l + 96] = d * static_cast<float>(sc[is + 6]) * static_cast<float>(q4);
      }
    }
  }
}

// ---- GGUF formats held in a wider one (quant.h: ggml_widening) ----

constexpr int64_t kQ5_0Bytes = 22, kQ3_KBytes = 110;

// Q5_0 (ggml block_q5_0: d, qh[4], qs[16]): element j < 16 is the low nibble of qs[j] with bit j of qh
// as its fifth bit, element j + 16 the high nibble with bit j + 16; value d * (q - 16).
void q5_0_levels(const uint8_t* blk, int8_t* q) {
  uint32_t qh;
  std::memcpy(&qh, blk + 2, 4);
  const uint8_t* qs = blk + 6;
  for (int j = 0; j < 16; ++j) {
    q[j] = static_cast<int8_t>(((qs[j] & 0xF) | (((qh >> j) & 1) << 4)) - 16);
    q[j + 16] = static_cast<int8_t>(((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16);
  }
}

// Q3_K (ggml block_q3_K: hmask[32], qs[64], scales[12], d): 16 six-bit scales s (value d * (s - 32) for
// each 16 elements) and 256 levels -4..3. In each half of 128 elements, group j (0..3) of 32 takes bits
// 2j of qs[32 half + l] and bit (4 half + j) of hmask[l] (set: +0, clear: -4) for its element l.
void q3_k_levels(const uint8_t* blk, int8_t* q, int8_t* scales) {
  const uint8_t* hmask = blk;
  const uint8_t* qs = blk + 32;
  const uint8_t* sc = blk + 96;
  for (int i = 0; i < 16; ++i) {
    const int low = i < 8 ? sc[i] & 0xF : sc[i - 8] >> 4;
    const int high = (sc[8 + i % 4] >> (2 * (i / 4))) & 3;
    scales[i] = static_cast<int8_t>((low | (high << 4)) - 32);
  }
  for (int half = 0; half < 2; ++half) {
    for (int j = 0; j < 4; ++j) {
      for (int l = 0; l < 32; ++l) {
        const int bits = (qs[32 * half + l] >> (2 * j)) & 3;
        const bool high = (hmask[l] >> (4 * half + j)) & 1;
        q[128 * half + 32 * j + l] = static_cast<int8_t>(bits - (high ? 0 : 4));
      }
    }
  }
}

}  // namespace

std::optional<GgmlWidening> ggml_widening(std::string_view format) {
  if (format == "q5_0") return GgmlWidening{QuantType::Q8_0, kQK, kQ5_0Bytes, 5.5};
  if (format == "q3_k") return GgmlWidening{QuantType::Q6_K, kQKK, kQ3_KBytes, 3.4375};
  return std::nullopt;
}

void widen_ggml_rows(std::string_view format, const uint8_t* in, int64_t rows, int64_t cols, uint8_t* out) {
  const auto w = ggml_widening(format);
  check(w.has_value() && cols > 0 && cols % w->block_elems == 0,
        "widen_ggml_rows: " + std::string(format) + " rows of " + std::to_string(cols) + " columns");
  const int64_t blocks = rows * (cols / w->block_elems);
  if (w->held == QuantType::Q8_0) {
    auto* y = reinterpret_cast<BlockQ8_0*>(out);
    for (int64_t b = 0; b < blocks; ++b, in += kQ5_0Bytes) {
      std::memcpy(&y[b].d, in, 2);  // the same fp16 scale: d * (q - 16) is d * q8
      q5_0_levels(in, y[b].qs);
    }
    return;
  }
  auto* y = reinterpret_cast<BlockQ6_K*>(out);
  int8_t q[256];
  for (int64_t b = 0; b < blocks; ++b, in += kQ3_KBytes) {
    q3_k_levels(in, q, y[b].scales);  // Q6_K's int8 scales take s - 32 (-32..31) as they are
    for (int8_t& level : q) level = static_cast<int8_t>(level + 32);
    pack_q6_k_levels(q, y[b]);
    std::memcpy(&y[b].d, in + 108, 2);
  }
}

void dequantize_ggml_row(std::string_view format, const uint8_t* in, int64_t cols, float* out) {
  const auto w = ggml_widening(format);
  check(w.has_value() && cols > 0 && cols % w->block_elems == 0,
        "dequantize_ggml_row: " + std::string(format) + " rows of " + std::to_string(cols) + " columns");
  int8_t q[256], scales[16];
  for (int64_t b = 0; b < cols / w->block_elems; ++b) {
    if (w->held == QuantType::Q8_0) {
      const uint8_t* blk = in + b * kQ5_0Bytes;
      uint16_t d;
      std::memcpy(&d, blk, 2);
      q5_0_levels(blk, q);
      for (int j = 0; j < 32; ++j) out[32 * b + j] = static_cast<float>(q[j]) * f16_to_f32(d);
    } else {
      const uint8_t* blk = in + b * kQ3_KBytes;
      uint16_t d;
      std::memcpy(&d, blk + 108, 2);
      q3_k_levels(blk, q, scales);
      for (int j = 0; j < 256; ++j)  // as llama.cpp: (d * (s - 32)) * q
        out[256 * b + j] = f16_to_f32(d) * static_cast<float>(scales[j / 16]) * static_cast<float>(q[j]);
    }
  }
}

namespace detail {

void ggml_quantize_row(QuantType t, const float* x, int64_t cols, uint8_t* out) {
  switch (t) {
    case QuantType::Q8_0: return quantize_q8_0(x, cols, reinterpret_cast<BlockQ8_0*>(out));
    case QuantType::Q4_0: return quantize_q4_0(x, cols, reinterpret_cast<BlockQ4_0*>(out));
    case QuantType::Q4_K: return quantize_q4_k(x, cols, reinterpret_cast<BlockQ4_K*>(out));
    case QuantType::Q5_K: return quantize_q5_k(x, cols, reinterpret_cast<BlockQ5_K*>(out));
    case QuantType::Q6_K: return quantize_q6_k(x, cols, reinterpret_cast<BlockQ6_K*>(out));
    default: throw Error("ggml_quantize_row: not a ggml block format");
  }
}

void ggml_dequantize_row(QuantType t, const uint8_t* in, int64_t cols, float* out) {
  switch (t) {
    case QuantType::Q8_0: return dequantize_q8_0(reinterpret_cast<const BlockQ8_0*>(in), cols, out);
    case QuantType::Q4_0: return dequantize_q4_0(reinterpret_cast<const BlockQ4_0*>(in), cols, out);
    case QuantType::Q4_K: return dequantize_q4_k(reinterpret_cast<const BlockQ4_K*>(in), cols, out);
    case QuantType::Q5_K: return dequantize_q5_k(reinterpret_cast<const BlockQ5_K*>(in), cols, out);
    case QuantType::Q6_K: return dequantize_q6_k(reinterpret_cast<const BlockQ6_K*>(in), cols, out);
    default: throw Error("ggml_dequantize_row: not a ggml block format");
  }
}

}  // namespace detail
}  // namespace bioquant
