// AVX-512 (F/BW/VL/DQ + VNNI) quantized matmul. Compiled with those flags only; chosen at run time.
//
// Integer formats (q8_0, q4_0, q4_k, q5_k, q6_k, int8): the activations are quantized once per
// call (qgemm_impl.h); a 64-byte vector of weight levels made unsigned (nibbles as they are, q8_0
// and int8 biased by 128) meets 64 int8 activations in one vpdpbusd, giving 16 int32 lanes of 4
// products each. Each lane is scaled in f32 by the activation block scale (E) and the weight
// (sub-)block scale (S); the bias and the K-quant mins come back through the activation sums:
//   lane value = S * (E * dot + C),   C = -bias * d_x * (sum of the lane's activation block) / lanes
// and for q4_k/q5_k one 8-wide FMA per super-block adds -dmin m_j * d_x,j * sum_j.
// nf4/fp4: f32 activations, permuted once per call so that the 32 code bytes of a block expand
// with two vpmovzxbd (low nibbles then high nibbles) into indices for vpermps on the block's
// 16-entry codebook scaled by its absmax.
//
// Rows are decoded once per tile of MR rows and reused for NR tokens (register tiles of MR x NR
// accumulators); decode (one token) runs 4 rows at a time.
#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "bioquant/quant/quant.h"

namespace bioquant {
namespace {

float f16(uint16_t h) { return _cvtsh_ss(h); }

#include "bioquant/kernels/cpu/qgemm_impl.h"

// ---------------------------------------------------------------------------------------------
// Per-call state.

struct Ctx {
  const WeightView* w;
  int64_t cols;
  int64_t cols_pad;  // multiple of 64
  int64_t groups;    // cols_pad / 64
  int64_t nlanes;    // cols_pad / 4
  ActQ a;            // quantized activations (integer formats)
  const float* e;    // [t * nlanes] activation scale per lane
  const float* c;    // [t * nlanes] correction per lane (bias formats), else null
  const float* ds;   // [t * nblk] d_x * sum per block of 32 (K-quant mins)
  const float* csum; // [t] sum of C over lanes (int8)
  const float* xp;   // [t * cols] permuted f32 activations (nf4/fp4)
};

// Per-row scales written by the row preparation: S lanes (16 per 64 columns; nf4/fp4: the scaled
// codebook of each 64-block), K-quant negated mins (8 per super-block), int8 scale.
struct RowPrep {
  const float* s;
  const float* m;
  float scale;
};

inline __m512 bcast_lanes8(float a, float b) {
  return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(a)), _mm256_set1_ps(b), 1);
}

// Scales a decode pass keeps per row: K-quant super-block scales (ws: 8 or 16 lanes) and negated
// mins (wm, lanes 0-7, rest 0); int8 row scale.
struct Super {
  __m512 ws, wm;
  float scale;
};

// Sub-block scale lanes within a 64-column group: pairs (q4_k/q5_k, 32-column sub-blocks, 8 lanes
// each) or quads (q6_k, 16-column sub-blocks, 4 lanes each).
inline __m512i pair_index(int64_t gg) {
  const int a = static_cast<int>(2 * gg);
  return _mm512_set_epi32(a + 1, a + 1, a + 1, a + 1, a + 1, a + 1, a + 1, a + 1, a, a, a, a, a, a, a, a);
}
inline __m512i quad_index(int64_t gg) {
  const int a = static_cast<int>(4 * gg);
  return _mm512_set_epi32(a + 3, a + 3, a + 3, a + 3, a + 2, a + 2, a + 2, a + 2, a + 1, a + 1, a + 1, a + 1, a, a, a, a);
}

// Q4_K/Q5_K super-block header (d, dmin, scales[12]) -> 8 scales d*sc_j and 8 negated mins.
inline void kquant_super(const uint8_t* blk, Super& st) {
  uint32_t u[3];
  std::memcpy(u, blk + 4, 12);
  const uint32_t sc_lo = u[0] & 0x3f3f3f3fu, m_lo = u[1] & 0x3f3f3f3fu;
  const uint32_t sc_hi = (u[2] & 0x0f0f0f0fu) | (((u[0] >> 6) & 0x03030303u) << 4);
  const uint32_t m_hi = ((u[2] >> 4) & 0x0f0f0f0fu) | (((u[1] >> 6) & 0x03030303u) << 4);
  const __m128i b = _mm_set_epi32(static_cast<int>(m_hi), static_cast<int>(m_lo), static_cast<int>(sc_hi),
                                  static_cast<int>(sc_lo));
  const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
  const __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)));
  st.ws = _mm512_castps256_ps512(_mm256_mul_ps(sc, _mm256_set1_ps(f16(load_u16(blk)))));
  st.wm = _mm512_zextps256_ps512(_mm256_mul_ps(mn, _mm256_set1_ps(-f16(load_u16(blk + 2)))));
}

// ---------------------------------------------------------------------------------------------
// Formats. Each provides: kBias (C lanes used), kMins (K-quant min term), weights(row, g) -> the 64
// unsigned levels of group g (columns 64g..64g+63), and prep_row(row, s, m, &scale).

struct FmtQ8_0 {
  static constexpr bool kBias = true, kMins = false;
  static constexpr float kBiasValue = 128.0f;
  static void prep_row(const Ctx& c, const uint8_t* row, float* s, float*, float*) {
    const int64_t nb = c.cols / 32;
    for (int64_t b = 0; b < nb; ++b) _mm256_storeu_ps(s + 8 * b, _mm256_set1_ps(f16(load_u16(row + 34 * b))));
    for (int64_t b = nb; b < c.cols_pad / 32; ++b) _mm256_storeu_ps(s + 8 * b, _mm256_setzero_ps());
  }
  static __m512i weights(const Ctx& c, const uint8_t* row, int64_t g) {
    const uint8_t* p = row + 68 * g;
    const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2));
    const __m256i hi = 64 * g + 32 < c.cols ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 36))
                                             : _mm256_setzero_si256();
    return _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), _mm512_set1_epi8(-128));
  }
  static void begin(const Ctx&, const uint8_t*, int64_t, Super&) {}
  static __m512 scale(const Ctx& c, const uint8_t* row, const Super&, int64_t g) {
    const float d1 = 64 * g + 32 < c.cols ? f16(load_u16(row + 68 * g + 34)) : 0.0f;
    return bcast_lanes8(f16(load_u16(row + 68 * g)), d1);
  }
};

struct FmtQ4_0 {
  static constexpr bool kBias = true, kMins = false;
  static constexpr float kBiasValue = 8.0f;
  static void prep_row(const Ctx& c, const uint8_t* row, float* s, float*, float*) {
    const int64_t nb = c.cols / 32;
    for (int64_t b = 0; b < nb; ++b) _mm256_storeu_ps(s + 8 * b, _mm256_set1_ps(f16(load_u16(row + 18 * b))));
    for (int64_t b = nb; b < c.cols_pad / 32; ++b) _mm256_storeu_ps(s + 8 * b, _mm256_setzero_ps());
  }
  static __m512i weights(const Ctx& c, const uint8_t* row, int64_t g) {
    const uint8_t* p = row + 36 * g;
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2));
    const __m128i b = 64 * g + 32 < c.cols ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 20)) : _mm_setzero_si128();
    const __m256i ab = _mm256_inserti128_si256(_mm256_castsi128_si256(a), b, 1);
    __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(ab), _mm256_srli_epi16(ab, 4), 1);  // a, b, a>>4, b>>4
    z = _mm512_shuffle_i64x2(z, z, _MM_SHUFFLE(3, 1, 2, 0));                                    // a, a>>4, b, b>>4
    return _mm512_and_si512(z, _mm512_set1_epi8(0x0F));
  }
  static void begin(const Ctx&, const uint8_t*, int64_t, Super&) {}
  static __m512 scale(const Ctx& c, const uint8_t* row, const Super&, int64_t g) {
    const float d1 = 64 * g + 32 < c.cols ? f16(load_u16(row + 36 * g + 18)) : 0.0f;
    return bcast_lanes8(f16(load_u16(row + 36 * g)), d1);
  }
};

// Q4_K / Q5_K scale unpacking into S lanes (8 per sub-block) and negated mins.
inline void prep_kquant_scales(const uint8_t* blk, float* s, float* m, int64_t sb) {
  const float d = f16(load_u16(blk)), dmin = f16(load_u16(blk + 2));
  const uint8_t* q = blk + 4;
  for (int j = 0; j < 8; ++j) {
    uint8_t sc, mn;
    if (j < 4) {
      sc = q[j] & 63;
      mn = q[j + 4] & 63;
    } else {
      sc = static_cast<uint8_t>((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
      mn = static_cast<uint8_t>((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
    _mm256_storeu_ps(s + 64 * sb + 8 * j, _mm256_set1_ps(d * sc));
    m[8 * sb + j] = -(dmin * mn);
  }
}

struct FmtQ4_K {
  static constexpr bool kBias = false, kMins = true;
  static constexpr float kBiasValue = 0.0f;
  static void prep_row(const Ctx& c, const uint8_t* row, float* s, float* m, float*) {
    for (int64_t sb = 0; sb < c.cols / 256; ++sb) prep_kquant_scales(row + 144 * sb, s, m, sb);
  }
  static __m512i weights(const Ctx&, const uint8_t* row, int64_t g) {
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 144 * (g / 4) + 16 + 32 * (g % 4)));
    const __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(q), _mm256_srli_epi16(q, 4), 1);
    return _mm512_and_si512(z, _mm512_set1_epi8(0x0F));
  }
  static void begin(const Ctx&, const uint8_t* row, int64_t sb, Super& st) { kquant_super(row + 144 * sb, st); }
  static __m512 scale(const Ctx&, const uint8_t*, const Super& st, int64_t g) {
    return _mm512_permutexvar_ps(pair_index(g % 4), st.ws);
  }
};

struct FmtQ5_K {
  static constexpr bool kBias = false, kMins = true;
  static constexpr float kBiasValue = 0.0f;
  static void prep_row(const Ctx& c, const uint8_t* row, float* s, float* m, float*) {
    for (int64_t sb = 0; sb < c.cols / 256; ++sb) prep_kquant_scales(row + 176 * sb, s, m, sb);
  }
  static __m512i weights(const Ctx&, const uint8_t* row, int64_t g) {
    const uint8_t* blk = row + 176 * (g / 4);
    const int gg = static_cast<int>(g % 4);
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 48 + 32 * gg));
    __m512i z = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(q), _mm256_srli_epi16(q, 4), 1),
                                 _mm512_set1_epi8(0x0F));
    // Fifth bit: weight l of the low half takes bit 2gg of qh[l], of the high half bit 2gg+1.
    const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16)));
    const __m512i sel = _mm512_inserti64x4(_mm512_set1_epi8(static_cast<char>(1 << (2 * gg))),
                                           _mm256_set1_epi8(static_cast<char>(2 << (2 * gg))), 1);
    const __mmask64 k = _mm512_test_epi8_mask(qh, sel);
    return _mm512_mask_add_epi8(z, k, z, _mm512_set1_epi8(16));
  }
  static void begin(const Ctx&, const uint8_t* row, int64_t sb, Super& st) { kquant_super(row + 176 * sb, st); }
  static __m512 scale(const Ctx&, const uint8_t*, const Super& st, int64_t g) {
    return _mm512_permutexvar_ps(pair_index(g % 4), st.ws);
  }
};

struct FmtQ6_K {
  static constexpr bool kBias = true, kMins = false;
  static constexpr float kBiasValue = 32.0f;
  static void prep_row(const Ctx& c, const uint8_t* row, float* s, float*, float*) {
    for (int64_t sb = 0; sb < c.cols / 256; ++sb) {
      const uint8_t* blk = row + 210 * sb;
      const float d = f16(load_u16(blk + 208));
      const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 192))));
      const __m512 ws = _mm512_mul_ps(sc, _mm512_set1_ps(d));
      // 4 lanes per 16-column sub-block.
      for (int q = 0; q < 4; ++q) {
        const __m512i idx = _mm512_set_epi32(4 * q + 3, 4 * q + 3, 4 * q + 3, 4 * q + 3, 4 * q + 2, 4 * q + 2, 4 * q + 2,
                                             4 * q + 2, 4 * q + 1, 4 * q + 1, 4 * q + 1, 4 * q + 1, 4 * q, 4 * q, 4 * q, 4 * q);
        _mm512_storeu_ps(s + 64 * sb + 16 * q, _mm512_permutexvar_ps(idx, ws));
      }
    }
  }
  static __m512i weights(const Ctx&, const uint8_t* row, int64_t g) {
    const uint8_t* blk = row + 210 * (g / 4);
    const int gg = static_cast<int>(g % 4), h = gg / 2;
    const __m512i l = _mm512_loadu_si512(blk + 64 * h);
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 128 + 32 * h));
    const __m512i hz = _mm512_inserti64x4(_mm512_castsi256_si512(qh), _mm256_srli_epi16(qh, 2), 1);
    const __m512i nib = _mm512_set1_epi8(0x0F);
    // Low 4 bits from ql (low or high nibble), bits 4-5 from qh (shifted into place), then mask.
    const __m512i t = (gg & 1) == 0 ? _mm512_ternarylogic_epi32(l, _mm512_slli_epi16(hz, 4), nib, 0xE4)
                                    : _mm512_ternarylogic_epi32(_mm512_srli_epi16(l, 4), hz, nib, 0xE4);
    return _mm512_and_si512(t, _mm512_set1_epi8(0x3F));
  }
  static void begin(const Ctx&, const uint8_t* row, int64_t sb, Super& st) {
    const uint8_t* blk = row + 210 * sb;
    const __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 192))));
    st.ws = _mm512_mul_ps(sc, _mm512_set1_ps(f16(load_u16(blk + 208))));
  }
  static __m512 scale(const Ctx&, const uint8_t*, const Super& st, int64_t g) {
    return _mm512_permutexvar_ps(quad_index(g % 4), st.ws);
  }
};

struct FmtInt8 {
  static constexpr bool kBias = true, kMins = false;
  static constexpr float kBiasValue = 128.0f;
  static void prep_row(const Ctx&, const uint8_t* row, float*, float*, float* scale) { *scale = load_f32(row) / 127.0f; }
  static __m512i weights(const Ctx& c, const uint8_t* row, int64_t g) {
    const int64_t left = c.cols - 64 * g;
    const __mmask64 k = left >= 64 ? ~__mmask64{0} : (__mmask64{1} << left) - 1;
    return _mm512_xor_si512(_mm512_maskz_loadu_epi8(k, row + 4 + 64 * g), _mm512_set1_epi8(-128));
  }
  static void begin(const Ctx&, const uint8_t*, int64_t, Super&) {}
  static __m512 scale(const Ctx&, const uint8_t*, const Super&, int64_t) { return _mm512_set1_ps(1.0f); }
};

// ---------------------------------------------------------------------------------------------
// Integer tile: MR rows x NR tokens over the whole row.

template <class F, int MR, int NR>
void int_tile(const Ctx& c, const uint8_t* const* rows, const RowPrep* rp, int64_t t0, float* y, int64_t ldy) {
  __m512 acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int t = 0; t < NR; ++t) acc[r][t] = _mm512_setzero_ps();
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t g = 0; g < c.groups; ++g) {
    __m512i wv[MR];
    __m512 sv[MR];
    for (int r = 0; r < MR; ++r) {
      wv[r] = F::weights(c, rows[r], g);
      if constexpr (!std::is_same_v<F, FmtInt8>) sv[r] = _mm512_loadu_ps(rp[r].s + 16 * g);
    }
    for (int t = 0; t < NR; ++t) {
      const int64_t tt = t0 + t;
      const __m512i xv = _mm512_loadu_si512(c.a.qt(tt) + 64 * g);
      const __m512 ev = _mm512_loadu_ps(c.e + tt * c.nlanes + 16 * g);
      if constexpr (std::is_same_v<F, FmtInt8>) {
        for (int r = 0; r < MR; ++r) {
          const __m512 dp = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, wv[r], xv));
          acc[r][t] = _mm512_fmadd_ps(ev, dp, acc[r][t]);
        }
      } else if constexpr (F::kBias) {
        const __m512 cv = _mm512_loadu_ps(c.c + tt * c.nlanes + 16 * g);
        for (int r = 0; r < MR; ++r) {
          const __m512 dp = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, wv[r], xv));
          acc[r][t] = _mm512_fmadd_ps(sv[r], _mm512_fmadd_ps(ev, dp, cv), acc[r][t]);
        }
      } else {
        for (int r = 0; r < MR; ++r) {
          const __m512 dp = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, wv[r], xv));
          acc[r][t] = _mm512_fmadd_ps(sv[r], _mm512_mul_ps(ev, dp), acc[r][t]);
        }
      }
    }
    if constexpr (F::kMins) {
      if (g % 4 == 3) {
        const int64_t sb = g / 4;
        __m512 mv[MR];
        for (int r = 0; r < MR; ++r) mv[r] = _mm512_maskz_loadu_ps(0xFF, rp[r].m + 8 * sb);
        for (int t = 0; t < NR; ++t) {
          const __m512 dv = _mm512_maskz_loadu_ps(0xFF, c.ds + (t0 + t) * c.a.nblk + 8 * sb);
          for (int r = 0; r < MR; ++r) acc[r][t] = _mm512_fmadd_ps(mv[r], dv, acc[r][t]);
        }
      }
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int t = 0; t < NR; ++t) {
      float v = _mm512_reduce_add_ps(acc[r][t]);
      if constexpr (std::is_same_v<F, FmtInt8>) v = (v + c.csum[t0 + t]) * rp[r].scale;
      y[(t0 + t) * ldy + r] = v;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Decode (one token): one pass over MR rows, scales decoded in registers as the data streams by.

// One row: a single sequential stream (interleaving several rows' streams costs a third of the
// bandwidth on the machine this was tuned on), two accumulators for even and odd groups.
template <class F>
inline __m512 int_decode_group(const Ctx& c, const uint8_t* row, const Super& st, int64_t g, __m512 acc) {
  const __m512i xv = _mm512_loadu_si512(c.a.qt(0) + 64 * g);
  const __m512 ev = _mm512_loadu_ps(c.e + 16 * g);
  const __m512 dp = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), F::weights(c, row, g), xv));
  if constexpr (std::is_same_v<F, FmtInt8>) {
    return _mm512_fmadd_ps(ev, dp, acc);
  } else if constexpr (F::kBias) {
    return _mm512_fmadd_ps(F::scale(c, row, st, g), _mm512_fmadd_ps(ev, dp, _mm512_loadu_ps(c.c + 16 * g)), acc);
  } else {
    return _mm512_fmadd_ps(F::scale(c, row, st, g), _mm512_mul_ps(ev, dp), acc);
  }
}

// One row: a single sequential stream (interleaving several rows' streams costs a third of the
// bandwidth on the machine this was tuned on), two accumulators for even and odd groups.
template <class F>
float int_decode_row(const Ctx& c, const uint8_t* row) {
  constexpr bool kSuperBlocks = std::is_same_v<F, FmtQ4_K> || std::is_same_v<F, FmtQ5_K> || std::is_same_v<F, FmtQ6_K>;
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  Super st{};
  if constexpr (kSuperBlocks) {
    for (int64_t sb = 0; sb < c.groups / 4; ++sb) {
      F::begin(c, row, sb, st);
      acc0 = int_decode_group<F>(c, row, st, 4 * sb, acc0);
      acc1 = int_decode_group<F>(c, row, st, 4 * sb + 1, acc1);
      acc0 = int_decode_group<F>(c, row, st, 4 * sb + 2, acc0);
      acc1 = int_decode_group<F>(c, row, st, 4 * sb + 3, acc1);
      if constexpr (F::kMins) acc0 = _mm512_fmadd_ps(st.wm, _mm512_maskz_loadu_ps(0xFF, c.ds + 8 * sb), acc0);
    }
  } else {
    int64_t g = 0;
    for (; g + 2 <= c.groups; g += 2) {
      acc0 = int_decode_group<F>(c, row, st, g, acc0);
      acc1 = int_decode_group<F>(c, row, st, g + 1, acc1);
    }
    if (g < c.groups) acc0 = int_decode_group<F>(c, row, st, g, acc0);
  }
  float v = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  if constexpr (std::is_same_v<F, FmtInt8>) v = (v + c.csum[0]) * (load_f32(row) / 127.0f);
  return v;
}

// ---------------------------------------------------------------------------------------------
// nf4 / fp4 tile (f32): per 64-block, 4 vectors of weights from the scaled codebook.

template <int MR, int NR>
void bnb_tile(const Ctx& c, const uint8_t* const* codes, const RowPrep* rp, int64_t t0, float* y, int64_t ldy) {
  __m512 acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int t = 0; t < NR; ++t) acc[r][t] = _mm512_setzero_ps();
  const int64_t nb = c.cols / 64;
  const int64_t stride = c.w->double_quant ? 33 : 36;
  for (int64_t b = 0; b < nb; ++b) {
    __m512 wv[MR][4];
    for (int r = 0; r < MR; ++r) {
      const __m512 cb = _mm512_loadu_ps(rp[r].s + 16 * b);
      const uint8_t* q = codes[r] + stride * b;
      const __m512i i0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
      const __m512i i1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16)));
      wv[r][0] = _mm512_permutexvar_ps(i0, cb);
      wv[r][1] = _mm512_permutexvar_ps(_mm512_srli_epi32(i0, 4), cb);
      wv[r][2] = _mm512_permutexvar_ps(i1, cb);
      wv[r][3] = _mm512_permutexvar_ps(_mm512_srli_epi32(i1, 4), cb);
    }
    for (int t = 0; t < NR; ++t) {
      const float* xp = c.xp + (t0 + t) * c.cols + 64 * b;
      for (int v = 0; v < 4; ++v) {
        const __m512 xv = _mm512_loadu_ps(xp + 16 * v);
        for (int r = 0; r < MR; ++r) acc[r][t] = _mm512_fmadd_ps(wv[r][v], xv, acc[r][t]);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int t = 0; t < NR; ++t) y[(t0 + t) * ldy + r] = _mm512_reduce_add_ps(acc[r][t]);
}

static int kPF = std::getenv("QPF") ? std::atoi(std::getenv("QPF")) : 512;
// Decode (one token), one row at a time: four accumulators, one per 16-column vector of a block.
float bnb_decode_row(const Ctx& c, const uint8_t* row) {
  const __m512 book = _mm512_loadu_ps(c.w->type == QuantType::NF4 ? nf4_codebook() : fp4_codebook());
  const int64_t nb = c.cols / 64;
  const bool dq = c.w->double_quant;
  const int64_t stride = dq ? 33 : 36;
  const uint8_t* codes = bnb_block_codes(row, nb, 0, dq);
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const __m512 cb = _mm512_mul_ps(book, _mm512_set1_ps(bnb_block_absmax(row, nb, b, dq)));
    const uint8_t* q = codes + stride * b;
    _mm_prefetch(reinterpret_cast<const char*>(q) + kPF, _MM_HINT_T0);
    const float* xp = c.xp + 64 * b;
    const __m512i i0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
    const __m512i i1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16)));
    a0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(i0, cb), _mm512_loadu_ps(xp), a0);
    a1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(i0, 4), cb), _mm512_loadu_ps(xp + 16), a1);
    a2 = _mm512_fmadd_ps(_mm512_permutexvar_ps(i1, cb), _mm512_loadu_ps(xp + 32), a2);
    a3 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(i1, 4), cb), _mm512_loadu_ps(xp + 48), a3);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

void bnb_prep_row(const Ctx& c, const uint8_t* row, float* s) {
  const float* book = c.w->type == QuantType::NF4 ? nf4_codebook() : fp4_codebook();
  const __m512 cb = _mm512_loadu_ps(book);
  const int64_t nb = c.cols / 64;
  for (int64_t b = 0; b < nb; ++b) {
    _mm512_storeu_ps(s + 16 * b, _mm512_mul_ps(cb, _mm512_set1_ps(bnb_block_absmax(row, nb, b, c.w->double_quant))));
  }
}

// ---------------------------------------------------------------------------------------------
// Drivers.

constexpr int64_t kTokenChunk = 32;  // activations of a chunk stay in L2 while all rows pass

template <class F>
void run_int(Ctx& c, int64_t n_tokens, int64_t row_begin, int64_t row_end, float* y, int64_t ldy) {
  const WeightView& w = *c.w;
  constexpr int MR = 4;
  const size_t s_floats = static_cast<size_t>(c.nlanes), m_floats = static_cast<size_t>(c.cols_pad / 32);
  float* scratch = static_cast<float*>(detail::qgemm_scratch(7, MR * (s_floats + m_floats + 16) * sizeof(float)));
  if (n_tokens == 1) {
    for (int64_t o = row_begin; o < row_end; ++o) y[o] = int_decode_row<F>(c, w.data + static_cast<size_t>(o) * w.row_bytes);
    return;
  }
  for (int64_t t0 = 0; t0 < n_tokens; t0 += kTokenChunk) {
    const int64_t t1 = imin(n_tokens, t0 + kTokenChunk);
    for (int64_t o = row_begin; o < row_end; o += MR) {
      const int mr = static_cast<int>(imin(MR, row_end - o));
      const uint8_t* rows[MR];
      RowPrep rp[MR];
      if (o + 2 * MR <= row_end) {
        const char* next = reinterpret_cast<const char*>(w.data + static_cast<size_t>(o + MR) * w.row_bytes);
        for (size_t off = 0; off < MR * w.row_bytes; off += 64) _mm_prefetch(next + off, _MM_HINT_T1);
      }
      for (int r = 0; r < mr; ++r) {
        rows[r] = w.data + static_cast<size_t>(o + r) * w.row_bytes;
        float* s = scratch + r * (s_floats + m_floats + 16);
        float* m = s + s_floats;
        rp[r] = RowPrep{s, m, 0.0f};
        F::prep_row(c, rows[r], s, m, &rp[r].scale);
      }
      float* yo = y + o;
      if (mr == MR) {
        if (n_tokens == 1) {
          int_tile<F, MR, 1>(c, rows, rp, t0, yo, ldy);
        } else {
          int64_t t = t0;
          for (; t + 4 <= t1; t += 4) int_tile<F, MR, 4>(c, rows, rp, t, yo, ldy);
          for (; t < t1; ++t) int_tile<F, MR, 1>(c, rows, rp, t, yo, ldy);
        }
      } else {
        for (int r = 0; r < mr; ++r) {
          int64_t t = t0;
          for (; t + 4 <= t1; t += 4) int_tile<F, 1, 4>(c, rows + r, rp + r, t, yo + r, ldy);
          for (; t < t1; ++t) int_tile<F, 1, 1>(c, rows + r, rp + r, t, yo + r, ldy);
        }
      }
    }
  }
}

void run_bnb(Ctx& c, int64_t n_tokens, int64_t row_begin, int64_t row_end, float* y, int64_t ldy) {
  const WeightView& w = *c.w;
  if (n_tokens == 1) {
    for (int64_t o = row_begin; o < row_end; ++o) y[o] = bnb_decode_row(c, w.data + static_cast<size_t>(o) * w.row_bytes);
    return;
  }
  constexpr int MR = 4;
  const int64_t nb = c.cols / 64;
  const size_t s_floats = static_cast<size_t>(16 * nb);
  float* scratch = static_cast<float*>(detail::qgemm_scratch(7, MR * (s_floats + 16) * sizeof(float)));
  for (int64_t t0 = 0; t0 < n_tokens; t0 += kTokenChunk) {
    const int64_t t1 = imin(n_tokens, t0 + kTokenChunk);
    for (int64_t o = row_begin; o < row_end; o += MR) {
      const int mr = static_cast<int>(imin(MR, row_end - o));
      const uint8_t* codes[MR];
      RowPrep rp[MR];
      for (int r = 0; r < mr; ++r) {
        const uint8_t* row = w.data + static_cast<size_t>(o + r) * w.row_bytes;
        codes[r] = bnb_block_codes(row, nb, 0, w.double_quant);
        float* s = scratch + r * (s_floats + 16);
        rp[r] = RowPrep{s, nullptr, 0.0f};
        bnb_prep_row(c, row, s);
      }
      float* yo = y + o;
      if (mr == MR) {
        int64_t t = t0;
        for (; t + 2 <= t1; t += 2) bnb_tile<MR, 2>(c, codes, rp, t, yo, ldy);
        for (; t < t1; ++t) bnb_tile<MR, 1>(c, codes, rp, t, yo, ldy);
      } else {
        for (int r = 0; r < mr; ++r) {
          int64_t t = t0;
          for (; t + 4 <= t1; t += 4) bnb_tile<1, 4>(c, codes + r, rp + r, t, yo + r, ldy);
          for (; t < t1; ++t) bnb_tile<1, 1>(c, codes + r, rp + r, t, yo + r, ldy);
        }
      }
    }
  }
}

// Lane arrays of the quantized activations: E (block scale per 4 quants), C (bias correction),
// ds (d * sum per block) and csum (sum of C, int8).
void build_lanes(Ctx& c, QuantType type) {
  const ActQ& a = c.a;
  const int64_t n = a.n_tokens;
  float* e = static_cast<float*>(detail::qgemm_scratch(4, static_cast<size_t>(n * c.nlanes) * sizeof(float)));
  float* cc = static_cast<float*>(detail::qgemm_scratch(5, static_cast<size_t>(n * c.nlanes) * sizeof(float)));
  float* ds = static_cast<float*>(detail::qgemm_scratch(6, static_cast<size_t>(n * (a.nblk + 1)) * sizeof(float)));
  float* csum = ds + n * a.nblk;
  float bias = 0.0f;
  if (type == QuantType::Q8_0 || type == QuantType::INT8) bias = 128.0f;
  if (type == QuantType::Q4_0) bias = 8.0f;
  if (type == QuantType::Q6_K) bias = 32.0f;
  for (int64_t t = 0; t < n; ++t) {
    const float* d = a.dt(t);
    const int32_t* s = a.st(t);
    const int32_t* s16 = a.s16t(t);
    float* et = e + t * c.nlanes;
    float* ct = cc + t * c.nlanes;
    float total = 0.0f;
    for (int64_t b = 0; b < a.nblk; ++b) {
      _mm256_storeu_ps(et + 8 * b, _mm256_set1_ps(d[b]));
      ds[t * a.nblk + b] = d[b] * static_cast<float>(s[b]);
      if (type == QuantType::Q6_K) {
        const float c0 = -bias * d[b] * static_cast<float>(s16[2 * b]) / 4.0f;
        const float c1 = -bias * d[b] * static_cast<float>(s16[2 * b + 1]) / 4.0f;
        _mm256_storeu_ps(ct + 8 * b, _mm256_insertf128_ps(_mm256_set1_ps(c0), _mm_set1_ps(c1), 1));
      } else {
        const float cb = -bias * d[b] * static_cast<float>(s[b]) / 8.0f;
        _mm256_storeu_ps(ct + 8 * b, _mm256_set1_ps(cb));
        total += -bias * d[b] * static_cast<float>(s[b]);
      }
    }
    csum[t] = total;
  }
  c.e = e;
  c.c = cc;
  c.ds = ds;
  c.csum = csum;
}

// nf4/fp4 activations permuted per 32 columns: the 16 odd columns (low nibbles) then the 16 even ones.
void permute_activations(Ctx& c, const float* x, int64_t ldx, int64_t n) {
  float* xp = static_cast<float*>(detail::qgemm_scratch(0, static_cast<size_t>(n * c.cols) * sizeof(float)));
  const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  for (int64_t t = 0; t < n; ++t) {
    const float* xt = x + t * ldx;
    float* pt = xp + t * c.cols;
    for (int64_t h = 0; h < c.cols; h += 32) {
      const __m512 lo = _mm512_loadu_ps(xt + h), hi = _mm512_loadu_ps(xt + h + 16);
      _mm512_storeu_ps(pt + h, _mm512_permutex2var_ps(lo, odd, hi));
      _mm512_storeu_ps(pt + h + 16, _mm512_permutex2var_ps(lo, even, hi));
    }
  }
  c.xp = xp;
}

}  // namespace

namespace detail {

void qgemm_avx512(const float* x, int64_t ldx, int64_t n_tokens, const WeightView& w, int64_t row_begin,
                  int64_t row_end, float* y, int64_t ldy) {
  Ctx c{};
  c.w = &w;
  c.cols = w.cols;
  c.cols_pad = round_up(w.cols, 64);
  c.groups = c.cols_pad / 64;
  c.nlanes = c.cols_pad / 4;
  if (w.type == QuantType::NF4 || w.type == QuantType::FP4) {
    permute_activations(c, x, ldx, n_tokens);
    run_bnb(c, n_tokens, row_begin, row_end, y, ldy);
    return;
  }
  c.a = quantize_activations(x, ldx, n_tokens, w.cols);
  build_lanes(c, w.type);
  switch (w.type) {
    case QuantType::Q8_0: return run_int<FmtQ8_0>(c, n_tokens, row_begin, row_end, y, ldy);
    case QuantType::Q4_0: return run_int<FmtQ4_0>(c, n_tokens, row_begin, row_end, y, ldy);
    case QuantType::Q4_K: return run_int<FmtQ4_K>(c, n_tokens, row_begin, row_end, y, ldy);
    case QuantType::Q5_K: return run_int<FmtQ5_K>(c, n_tokens, row_begin, row_end, y, ldy);
    case QuantType::Q6_K: return run_int<FmtQ6_K>(c, n_tokens, row_begin, row_end, y, ldy);
    case QuantType::INT8: return run_int<FmtInt8>(c, n_tokens, row_begin, row_end, y, ldy);
    default: return;
  }
}

}  // namespace detail
}  // namespace bioquant
