// Scalar reference of the quantized matmul: the oracle the SIMD kernels are tested against.
// Written from the format definitions, one (token, row) dot product at a time:
//   q8_0  y = sum_b dw_b dx_b sum_i qw_i qx_i
//   q4_0  y = sum_b dw_b dx_b sum_i (qw_i - 8) qx_i
//   q4_k  y = sum_j dx_j (d sc_j sum_i q_i qx_i - dmin m_j sum_i qx_i)   (j: sub-blocks of 32; q5_k alike)
//   q6_k  y = sum_k dx_(k/2) d sc_k sum_i (q_i - 32) qx_i               (k: sub-blocks of 16)
//   int8  y = absmax/127 sum_b dx_b sum_i q_i qx_i
//   nf4/fp4 y = sum_b absmax_b 2^-14 sum_j dx_j sum_i cb16[c_i] qx_i         (cb16: codebook in Q1.14)
// where qx, dx are the activations quantized per 32 (qgemm_impl.h) and integer sums are exact.
#include <cstdint>
#include <cstring>

#include "bioquant/core/half.h"
#include "bioquant/quant/quant.h"

namespace bioquant {
namespace {

float f16(uint16_t h) { return f16_to_f32(h); }

#include "bioquant/kernels/cpu/qgemm_impl.h"

// Integer levels of one K-quant super-block (q4_k/q5_k: 0..31; q6_k: -32..31).
void levels_q4_k(const BlockQ4_K& b, int32_t* L) {
  for (int g = 0; g < 4; ++g) {
    for (int l = 0; l < 32; ++l) {
      L[64 * g + l] = b.qs[32 * g + l] & 0xF;
      L[64 * g + 32 + l] = b.qs[32 * g + l] >> 4;
    }
  }
}
void levels_q5_k(const BlockQ5_K& b, int32_t* L) {
  for (int g = 0; g < 4; ++g) {
    for (int l = 0; l < 32; ++l) {
      L[64 * g + l] = (b.qs[32 * g + l] & 0xF) | (((b.qh[l] >> (2 * g)) & 1) << 4);
      L[64 * g + 32 + l] = (b.qs[32 * g + l] >> 4) | (((b.qh[l] >> (2 * g + 1)) & 1) << 4);
    }
  }
}
void levels_q6_k(const BlockQ6_K& b, int32_t* L) {
  for (int h = 0; h < 2; ++h) {
    const uint8_t* ql = b.ql + 64 * h;
    const uint8_t* qh = b.qh + 32 * h;
    int32_t* Lh = L + 128 * h;
    for (int l = 0; l < 32; ++l) {
      Lh[l] = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
      Lh[l + 32] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
      Lh[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      Lh[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
    }
  }
}

int32_t idot(const int32_t* a, const int8_t* b, int n) {
  int32_t s = 0;
  for (int i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

float dot_row(const WeightView& w, const uint8_t* row, const ActQ& a, int64_t t) {
  const int64_t cols = w.cols;
  const int8_t* qx = a.qt(t);
  const float* dx = a.dt(t);
  const int32_t* sx = a.st(t);
  int32_t L[256];
  float acc = 0.0f;
  switch (w.type) {
    case QuantType::Q8_0: {
      const auto* blk = reinterpret_cast<const BlockQ8_0*>(row);
      for (int64_t b = 0; b < cols / 32; ++b) {
        int32_t s = 0;
        for (int i = 0; i < 32; ++i) s += blk[b].qs[i] * qx[32 * b + i];
        acc += f16(blk[b].d) * dx[b] * static_cast<float>(s);
      }
      return acc;
    }
    case QuantType::Q4_0: {
      const auto* blk = reinterpret_cast<const BlockQ4_0*>(row);
      for (int64_t b = 0; b < cols / 32; ++b) {
        int32_t s = 0;
        for (int i = 0; i < 16; ++i) {
          s += ((blk[b].qs[i] & 0xF) - 8) * qx[32 * b + i];
          s += ((blk[b].qs[i] >> 4) - 8) * qx[32 * b + 16 + i];
        }
        acc += f16(blk[b].d) * dx[b] * static_cast<float>(s);
      }
      return acc;
    }
    case QuantType::Q4_K:
    case QuantType::Q5_K: {
      for (int64_t sb = 0; sb < cols / 256; ++sb) {
        const uint8_t* scales;
        float d, dmin;
        if (w.type == QuantType::Q4_K) {
          const auto& blk = reinterpret_cast<const BlockQ4_K*>(row)[sb];
          levels_q4_k(blk, L);
          scales = blk.scales;
          d = f16(blk.d);
          dmin = f16(blk.dmin);
        } else {
          const auto& blk = reinterpret_cast<const BlockQ5_K*>(row)[sb];
          levels_q5_k(blk, L);
          scales = blk.scales;
          d = f16(blk.d);
          dmin = f16(blk.dmin);
        }
        for (int j = 0; j < 8; ++j) {
          uint8_t sc, m;
          kquant_scale_min(scales, j, &sc, &m);
          const int64_t b = sb * 8 + j;
          const int32_t s = idot(L + 32 * j, qx + 32 * b, 32);
          acc += dx[b] * (d * sc * static_cast<float>(s) - dmin * m * static_cast<float>(sx[b]));
        }
      }
      return acc;
    }
    case QuantType::Q6_K: {
      for (int64_t sb = 0; sb < cols / 256; ++sb) {
        const auto& blk = reinterpret_cast<const BlockQ6_K*>(row)[sb];
        levels_q6_k(blk, L);
        const float d = f16(blk.d);
        for (int k = 0; k < 16; ++k) {
          const int64_t e = sb * 256 + 16 * k;
          const int32_t s = idot(L + 16 * k, qx + e, 16);
          acc += dx[e / 32] * d * static_cast<float>(blk.scales[k]) * static_cast<float>(s);
        }
      }
      return acc;
    }
    case QuantType::INT8: {
      const auto* q = reinterpret_cast<const int8_t*>(row + 4);
      for (int64_t b = 0; b * 32 < cols; ++b) {
        int32_t s = 0;
        for (int64_t i = 32 * b; i < cols && i < 32 * b + 32; ++i) s += q[i] * qx[i];
        acc += dx[b] * static_cast<float>(s);
      }
      return acc * (load_f32(row) / 127.0f);
    }
    case QuantType::NF4:
    case QuantType::FP4: {
      int16_t cb[16];
      bnb_codebook_q14(w.type, cb);
      const int64_t nb = cols / 64;
      for (int64_t b = 0; b < nb; ++b) {
        const float absmax = bnb_block_absmax(row, nb, b, w.double_quant);
        const uint8_t* c = bnb_block_codes(row, nb, b, w.double_quant);
        for (int h = 0; h < 2; ++h) {  // the two activation blocks of 32
          int32_t s = 0;
          for (int k = 16 * h; k < 16 * h + 16; ++k) {
            s += cb[c[k] >> 4] * qx[64 * b + 2 * k];
            s += cb[c[k] & 0xF] * qx[64 * b + 2 * k + 1];
          }
          acc += absmax * kBnbCodeScale * dx[2 * b + h] * static_cast<float>(s);
        }
      }
      return acc;
    }
    default: return 0.0f;
  }
}

}  // namespace

namespace detail {

void qgemm_scalar(const float* x, int64_t ldx, int64_t n_tokens, const WeightView& w, int64_t row_begin,
                  int64_t row_end, float* y, int64_t ldy) {
  const ActQ a = quantize_activations(x, ldx, n_tokens, w.cols);
  for (int64_t t = 0; t < n_tokens; ++t) {
    for (int64_t o = row_begin; o < row_end; ++o) {
      y[t * ldy + o] = dot_row(w, w.data + static_cast<size_t>(o) * w.row_bytes, a, t);
    }
  }
}

}  // namespace detail
}  // namespace bioquant
