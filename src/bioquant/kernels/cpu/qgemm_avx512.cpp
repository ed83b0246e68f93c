// AVX-512 (F/BW/VL/DQ + VNNI) quantized matmul. Compiled with those flags only; chosen at run time.
//
// The activations are quantized once per call (qgemm_impl.h). A 64-byte vector of weight levels
// made unsigned (nibbles as they are, q8_0 and int8 biased by 128) meets 64 int8 activations in
// one vpdpbusd, giving 16 int32 lanes of 4 products each. Each lane is scaled in f32 by the
// activation block scale (E) and the weight (sub-)block scale (S); the bias and the K-quant mins
// come back through the activation sums:
//   lane value = S * (E * dot + C),   C = -bias * d_x * (sum of the lane's activation block) / lanes
// and for q4_k/q5_k one 8-wide FMA per super-block adds -dmin m_j * d_x,j * sum_j.
// q4_0 goes 4 blocks (128 columns) at a time: both nibble halves chain into the same lanes.
// nf4/fp4: vpermw looks the 64 codes of a block up in the Q1.14 codebook; vpmaddwd + vpdpwssd
// against int16 activations (odd columns, then even ones) give the lanes of its two 32-blocks.
//
// Decode (one token) streams two rows per core, taken far apart: on the machine this was tuned on
// (AMD EPYC, Zen 4 class VM) that reads faster than one stream, and two ADJACENT rows read slower.
// Prefill decodes each row once per register tile and reuses it for several tokens.
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "bioquant/quant/quant.h"

namespace bioquant {
namespace {

float f16(uint16_t h) { return _cvtsh_ss(h); }

#include "bioquant/kernels/cpu/qgemm_impl.h"

// quantize_activations (qgemm_impl.h) in AVX-512, bit for bit: the same f32 products, and
// vcvtps2dq rounds half to even as q_round does (|x * id| <= 127 + ulp, far inside its range).
ActQ quantize_activations_512(const float* x, int64_t ldx, int64_t n_tokens, int64_t cols) {
  ActQ a = activation_buffers(n_tokens, cols);
  for (int64_t t = 0; t < n_tokens; ++t) {
    const float* xt = x + t * ldx;
    int8_t* qt = a.q + t * a.cols_pad;
    for (int64_t b = 0; b < a.nblk; ++b) {
      const int64_t c0 = b * 32;
      const int64_t n = c0 >= cols ? 0 : imin(32, cols - c0);
      const __mmask16 m0 = static_cast<__mmask16>(n >= 16 ? 0xFFFF : (1u << n) - 1);
      const __mmask16 m1 = static_cast<__mmask16>(n >= 32 ? 0xFFFF : n <= 16 ? 0 : (1u << (n - 16)) - 1);
      const __m512 v0 = _mm512_maskz_loadu_ps(m0, xt + c0);
      const __m512 v1 = _mm512_maskz_loadu_ps(m1, xt + c0 + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      const float d = amax / 127.0f;
      const float id = d != 0.0f ? 1.0f / d : 0.0f;
      const __m512 vid = _mm512_set1_ps(id);
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, vid));
      const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, vid));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qt + c0), _mm512_cvtepi32_epi8(q0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qt + c0 + 16), _mm512_cvtepi32_epi8(q1));
      const int32_t lo = _mm512_reduce_add_epi32(q0), hi = _mm512_reduce_add_epi32(q1);
      a.d[t * a.nblk + b] = d;
      a.s[t * a.nblk + b] = lo + hi;
      a.s16[t * 2 * a.nblk + 2 * b] = lo;
      a.s16[t * 2 * a.nblk + 2 * b + 1] = hi;
    }
  }
  return a;
}

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
  // nf4/fp4: int16 activations per 64 columns [32 odd columns | 32 even columns] (the low and the
  // high nibbles of the 32 code bytes).
  const int16_t* x16;  // [t * cols_pad]
  // q4_0: per 128 columns (4 blocks) [16 first + ... | 16 last of each block] = the low and the high
  // nibbles of the 4 blocks' qs; lanes per unit: E and C (16 each, 4 per block).
  const int8_t* qxu;   // [t * units * 128]
  const float* eu;     // [t * units * 16]
  const float* cu;     // [t * units * 16]
  int64_t units;
};

// Per-row scales written by the prefill row preparation: S lanes (16 per 64 columns), K-quant
// negated mins (8 per super-block), int8 scale (absmax / 127).
struct RowPrep {
  const float* s;
  const float* m;
  float scale;
};

inline __m512 bcast_lanes8(float a, float b) {
  return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(a)), _mm256_set1_ps(b), 1);
}

// Scales a decode pass keeps per row: K-quant super-block scales (ws: 8 or 16 lanes) and negated
// mins (wm, lanes 0-7, rest 0).
struct Super {
  __m512 ws, wm;
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
// unsigned levels of group g (columns 64g..64g+63), scale(row, super, g) -> their 16 lane scales
// (decode), begin(row, sb, super) per super-block, and prep_row(row, s, m, &scale) (prefill).

struct FmtQ8_0 {
  static constexpr bool kBias = true, kMins = false;
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

// Two rows at once, far apart in memory (pair_rows below): two streams in flight per core read
// faster than one on the machine this was tuned on, while two adjacent rows read much slower.
template <class F>
void int_decode_row2(const Ctx& c, const uint8_t* r0, const uint8_t* r1, float* out0, float* out1) {
  constexpr bool kSuperBlocks = std::is_same_v<F, FmtQ4_K> || std::is_same_v<F, FmtQ5_K> || std::is_same_v<F, FmtQ6_K>;
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
  Super s0{}, s1{};
  if constexpr (kSuperBlocks) {
    for (int64_t sb = 0; sb < c.groups / 4; ++sb) {
      F::begin(c, r0, sb, s0);
      F::begin(c, r1, sb, s1);
      for (int64_t g = 4 * sb; g < 4 * sb + 4; g += 2) {
        a0 = int_decode_group<F>(c, r0, s0, g, a0);
        b0 = int_decode_group<F>(c, r1, s1, g, b0);
        a1 = int_decode_group<F>(c, r0, s0, g + 1, a1);
        b1 = int_decode_group<F>(c, r1, s1, g + 1, b1);
      }
      if constexpr (F::kMins) {
        const __m512 dsum = _mm512_maskz_loadu_ps(0xFF, c.ds + 8 * sb);
        a0 = _mm512_fmadd_ps(s0.wm, dsum, a0);
        b0 = _mm512_fmadd_ps(s1.wm, dsum, b0);
      }
    }
  } else {
    int64_t g = 0;
    for (; g + 2 <= c.groups; g += 2) {
      a0 = int_decode_group<F>(c, r0, s0, g, a0);
      b0 = int_decode_group<F>(c, r1, s1, g, b0);
      a1 = int_decode_group<F>(c, r0, s0, g + 1, a1);
      b1 = int_decode_group<F>(c, r1, s1, g + 1, b1);
    }
    if (g < c.groups) {
      a0 = int_decode_group<F>(c, r0, s0, g, a0);
      b0 = int_decode_group<F>(c, r1, s1, g, b0);
    }
  }
  float v0 = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)), v1 = _mm512_reduce_add_ps(_mm512_add_ps(b0, b1));
  if constexpr (std::is_same_v<F, FmtInt8>) {
    v0 = (v0 + c.csum[0]) * (load_f32(r0) / 127.0f);
    v1 = (v1 + c.csum[0]) * (load_f32(r1) / 127.0f);
  }
  *out0 = v0;
  *out1 = v1;
}

// Decode over rows [begin, end): row o is paired with row o + half (see int_decode_row2); an odd
// last row is paired with itself (each row has its own accumulators, so its value is the same).
template <class Two>
void pair_rows(int64_t begin, int64_t end, Two&& two) {
  const int64_t half = (end - begin) / 2;
  for (int64_t o = begin; o < begin + half; ++o) two(o, o + half);
  if ((end - begin) % 2 != 0) two(end - 1, end - 1);
}

// ---------------------------------------------------------------------------------------------
// nf4 / fp4 (integer): 32 code bytes -> 32 words (vpmovzxbw); the low nibbles index the odd
// columns, the high nibbles the even ones; vpermw looks both up in the Q1.14 codebook; vpmaddwd +
// vpdpwssd against the int16 activations give 16 int32 lanes (8 per activation block of 32).

inline __m512i bnb_book16(QuantType t) {
  alignas(64) int16_t tab[32] = {};
  bnb_codebook_q14(t, tab);
  return _mm512_load_si512(tab);
}

// Dot products of the 64 columns of block b: int32 lanes 0-7 for the first 32 columns, 8-15 for the last.
inline __m512i bnb_block_dot(const __m512i book, const uint8_t* q, const int16_t* x16) {
  const __m512i z = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
  const __m512i wlo = _mm512_permutexvar_epi16(_mm512_and_si512(z, _mm512_set1_epi16(0x0F)), book);
  const __m512i whi = _mm512_permutexvar_epi16(_mm512_srli_epi16(z, 4), book);
  return _mm512_dpwssd_epi32(_mm512_madd_epi16(wlo, _mm512_loadu_si512(x16)), whi, _mm512_loadu_si512(x16 + 32));
}

// Two far-apart rows at once (see int_decode_row2).
template <bool kDq>
void bnb_decode_row2(const Ctx& c, const uint8_t* r0, const uint8_t* r1, const __m512i book, float* out0, float* out1) {
  const int64_t nb = c.cols / 64;
  constexpr int64_t stride = kDq ? 33 : 36;
  const uint8_t* codes0 = bnb_block_codes(r0, nb, 0, kDq);
  const uint8_t* codes1 = bnb_block_codes(r1, nb, 0, kDq);
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
  alignas(64) float am0[16], am1[16];
  const auto block = [&](const uint8_t* row, const uint8_t* codes, const float* am16, int64_t b, __m512 acc) {
    const float am = kDq ? am16[b % 16] : load_f32(row + 36 * b);
    const __m512 f = _mm512_cvtepi32_ps(bnb_block_dot(book, codes + stride * b, c.x16 + 64 * b));
    return _mm512_fmadd_ps(f, _mm512_mul_ps(_mm512_loadu_ps(c.e + 16 * b), _mm512_set1_ps(am)), acc);
  };
  for (int64_t b0_ = 0; b0_ < nb; b0_ += 16) {
    if constexpr (kDq) {
      bnb_absmax16(r0, nb, b0_, true, am0);
      bnb_absmax16(r1, nb, b0_, true, am1);
    }
    const int64_t b1_ = imin(nb, b0_ + 16);
    int64_t b = b0_;
    for (; b + 2 <= b1_; b += 2) {
      a0 = block(r0, codes0, am0, b, a0);
      b0 = block(r1, codes1, am1, b, b0);
      a1 = block(r0, codes0, am0, b + 1, a1);
      b1 = block(r1, codes1, am1, b + 1, b1);
    }
    if (b < b1_) {
      a0 = block(r0, codes0, am0, b, a0);
      b0 = block(r1, codes1, am1, b, b0);
    }
  }
  *out0 = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) * kBnbCodeScale;
  *out1 = _mm512_reduce_add_ps(_mm512_add_ps(b0, b1)) * kBnbCodeScale;
}

// MR rows x NR tokens.
template <int MR, int NR>
void bnb_tile(const Ctx& c, const uint8_t* const* codes, const float* const* absmax, int64_t t0, float* y, int64_t ldy,
              const __m512i book) {
  __m512 acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int t = 0; t < NR; ++t) acc[r][t] = _mm512_setzero_ps();
  const int64_t nb = c.cols / 64;
  const int64_t stride = c.w->double_quant ? 33 : 36;
  for (int64_t b = 0; b < nb; ++b) {
    __m512i wlo[MR], whi[MR];
    for (int r = 0; r < MR; ++r) {
      const __m512i z = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes[r] + stride * b)));
      wlo[r] = _mm512_permutexvar_epi16(_mm512_and_si512(z, _mm512_set1_epi16(0x0F)), book);
      whi[r] = _mm512_permutexvar_epi16(_mm512_srli_epi16(z, 4), book);
    }
    for (int t = 0; t < NR; ++t) {
      const int16_t* x16 = c.x16 + (t0 + t) * c.cols_pad + 64 * b;
      const __m512 ev = _mm512_loadu_ps(c.e + (t0 + t) * c.nlanes + 16 * b);
      const __m512i xo = _mm512_loadu_si512(x16), xe = _mm512_loadu_si512(x16 + 32);
      for (int r = 0; r < MR; ++r) {
        const __m512 f = _mm512_cvtepi32_ps(_mm512_dpwssd_epi32(_mm512_madd_epi16(wlo[r], xo), whi[r], xe));
        acc[r][t] = _mm512_fmadd_ps(f, _mm512_mul_ps(ev, _mm512_set1_ps(absmax[r][b])), acc[r][t]);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int t = 0; t < NR; ++t) y[(t0 + t) * ldy + r] = _mm512_reduce_add_ps(acc[r][t]) * kBnbCodeScale;
}

// ---------------------------------------------------------------------------------------------
// q4_0 in units of 4 blocks (128 columns, 72 bytes): the 4 x 16 qs bytes in one vector, low
// nibbles against the first 16 columns of each block, high nibbles against the last 16, chained
// into the same 16 int32 lanes (4 per block); the 4 fp16 scales picked out of the unit with vpermw.

inline __m512 q4_0_unit_scale(const uint8_t* p) {
  const __m512i idx = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 27, 27, 27, 27, 18, 18, 18, 18, 9, 9,
                                       9, 9, 0, 0, 0, 0);
  const __m512i d = _mm512_permutexvar_epi16(idx, _mm512_loadu_si512(p));
  return _mm512_cvtph_ps(_mm512_castsi512_si256(d));
}

inline void q4_0_unit_levels(const uint8_t* p, __m512i& lo, __m512i& hi) {
  __m512i z = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2)));
  z = _mm512_inserti32x4(z, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 20)), 1);
  z = _mm512_inserti32x4(z, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 38)), 2);
  z = _mm512_inserti32x4(z, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 56)), 3);
  lo = _mm512_and_si512(z, _mm512_set1_epi8(0x0F));
  hi = _mm512_and_si512(_mm512_srli_epi16(z, 4), _mm512_set1_epi8(0x0F));
}

// The row's unit u, or a zero-padded copy of its last (short) unit.
inline const uint8_t* q4_0_unit_ptr(const uint8_t* row, int64_t nb, int64_t u, uint8_t* tail) {
  if (4 * u + 4 <= nb) return row + 72 * u;
  std::memset(tail, 0, 72);
  std::memcpy(tail, row + 72 * u, static_cast<size_t>(18 * (nb - 4 * u)));
  return tail;
}

// Two far-apart rows at once (see int_decode_row2).
void q4_0_decode_row2(const Ctx& c, const uint8_t* r0, const uint8_t* r1, float* out0, float* out1) {
  const int64_t nb = c.cols / 32;
  alignas(64) uint8_t tail0[128], tail1[128];
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
  const __m512i zero = _mm512_setzero_si512();
  for (int64_t u = 0; u < c.units; ++u) {
    const uint8_t* p0 = q4_0_unit_ptr(r0, nb, u, tail0);
    const uint8_t* p1 = q4_0_unit_ptr(r1, nb, u, tail1);
    const int8_t* x = c.qxu + 128 * u;
    const __m512i xlo = _mm512_loadu_si512(x), xhi = _mm512_loadu_si512(x + 64);
    const __m512 eu = _mm512_loadu_ps(c.eu + 16 * u), cu = _mm512_loadu_ps(c.cu + 16 * u);
    __m512i lo0, hi0, lo1, hi1;
    q4_0_unit_levels(p0, lo0, hi0);
    q4_0_unit_levels(p1, lo1, hi1);
    const __m512i d0 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo0, xlo), hi0, xhi);
    const __m512i d1 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo1, xlo), hi1, xhi);
    const __m512 t0 = _mm512_fmadd_ps(eu, _mm512_cvtepi32_ps(d0), cu);
    const __m512 t1 = _mm512_fmadd_ps(eu, _mm512_cvtepi32_ps(d1), cu);
    if (u & 1) {
      a1 = _mm512_fmadd_ps(q4_0_unit_scale(p0), t0, a1);
      b1 = _mm512_fmadd_ps(q4_0_unit_scale(p1), t1, b1);
    } else {
      a0 = _mm512_fmadd_ps(q4_0_unit_scale(p0), t0, a0);
      b0 = _mm512_fmadd_ps(q4_0_unit_scale(p1), t1, b0);
    }
  }
  *out0 = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
  *out1 = _mm512_reduce_add_ps(_mm512_add_ps(b0, b1));
}

template <int MR, int NR>
void q4_0_tile(const Ctx& c, const uint8_t* const* rows, int64_t t0, float* y, int64_t ldy) {
  __m512 acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int t = 0; t < NR; ++t) acc[r][t] = _mm512_setzero_ps();
  const int64_t nb = c.cols / 32;
  const __m512i zero = _mm512_setzero_si512();
  alignas(64) uint8_t tail[MR][128];
  alignas(64) float scale[MR][16];
  for (int64_t u = 0; u < c.units; ++u) {
    __m512i lo[MR], hi[MR];
    for (int r = 0; r < MR; ++r) {
      const uint8_t* p = q4_0_unit_ptr(rows[r], nb, u, tail[r]);
      q4_0_unit_levels(p, lo[r], hi[r]);
      _mm512_store_ps(scale[r], q4_0_unit_scale(p));
    }
    for (int t = 0; t < NR; ++t) {
      const int64_t tt = t0 + t;
      const int8_t* x = c.qxu + (tt * c.units + u) * 128;
      const __m512i xl = _mm512_loadu_si512(x), xh = _mm512_loadu_si512(x + 64);
      const __m512 ev = _mm512_loadu_ps(c.eu + (tt * c.units + u) * 16);
      const __m512 cv = _mm512_loadu_ps(c.cu + (tt * c.units + u) * 16);
      for (int r = 0; r < MR; ++r) {
        const __m512i dp = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo[r], xl), hi[r], xh);
        acc[r][t] = _mm512_fmadd_ps(_mm512_load_ps(scale[r]), _mm512_fmadd_ps(ev, _mm512_cvtepi32_ps(dp), cv), acc[r][t]);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int t = 0; t < NR; ++t) y[(t0 + t) * ldy + r] = _mm512_reduce_add_ps(acc[r][t]);
}

// ---------------------------------------------------------------------------------------------
// Drivers.

constexpr int64_t kTokenChunk = 36;  // activations of a chunk stay in L2 while all rows pass
// Prefill register tiles, rows x tokens (accumulators + decoded rows + one token's activations
// must fit the 32 vector registers; shapes picked by measurement per kernel).

template <class F>
void run_int(Ctx& c, int64_t n_tokens, int64_t row_begin, int64_t row_end, float* y, int64_t ldy) {
  const WeightView& w = *c.w;
  constexpr int MR = 4, NR = 3;
  const size_t s_floats = static_cast<size_t>(c.nlanes), m_floats = static_cast<size_t>(c.cols_pad / 32);
  float* scratch = static_cast<float*>(detail::qgemm_scratch(7, MR * (s_floats + m_floats + 16) * sizeof(float)));
  if (n_tokens == 1) {
    const auto row = [&](int64_t o) { return w.data + static_cast<size_t>(o) * w.row_bytes; };
    pair_rows(row_begin, row_end, [&](int64_t o0, int64_t o1) { int_decode_row2<F>(c, row(o0), row(o1), y + o0, y + o1); });
    return;
  }
  for (int64_t t0 = 0; t0 < n_tokens; t0 += kTokenChunk) {
    const int64_t t1 = imin(n_tokens, t0 + kTokenChunk);
    for (int64_t o = row_begin; o < row_end; o += MR) {
      const int mr = static_cast<int>(imin(MR, row_end - o));
      const uint8_t* rows[MR];
      RowPrep rp[MR];
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
          for (; t + NR <= t1; t += NR) int_tile<F, MR, NR>(c, rows, rp, t, yo, ldy);
          for (; t < t1; ++t) int_tile<F, MR, 1>(c, rows, rp, t, yo, ldy);
        }
      } else {
        for (int r = 0; r < mr; ++r) {
          int64_t t = t0;
          for (; t + NR <= t1; t += NR) int_tile<F, 1, NR>(c, rows + r, rp + r, t, yo + r, ldy);
          for (; t < t1; ++t) int_tile<F, 1, 1>(c, rows + r, rp + r, t, yo + r, ldy);
        }
      }
    }
  }
}

// Row tiles over token chunks, shared by the nf4/fp4 and q4_0 drivers: tile(mr, nr, row, token)
// with mr in {kTileRows, 1} and nr in {kTileTokens, 1} as integral constants.
template <int kTileRows, int kTileTokens, class Tile>
void run_tiles(int64_t n_tokens, int64_t row_begin, int64_t row_end, Tile&& tile) {
  using R = std::integral_constant<int, kTileRows>;
  using T = std::integral_constant<int, kTileTokens>;
  using One = std::integral_constant<int, 1>;
  for (int64_t t0 = 0; t0 < n_tokens; t0 += kTokenChunk) {
    const int64_t t1 = imin(n_tokens, t0 + kTokenChunk);
    for (int64_t o = row_begin; o < row_end; o += kTileRows) {
      if (o + kTileRows <= row_end) {
        int64_t t = t0;
        for (; t + kTileTokens <= t1; t += kTileTokens) tile(R{}, T{}, o, t);
        for (; t < t1; ++t) tile(R{}, One{}, o, t);
      } else {
        for (int64_t r = o; r < row_end; ++r) {
          int64_t t = t0;
          for (; t + kTileTokens <= t1; t += kTileTokens) tile(One{}, T{}, r, t);
          for (; t < t1; ++t) tile(One{}, One{}, r, t);
        }
      }
    }
  }
}

constexpr int kBnbTileRows = 3, kBnbTileTokens = 4;

void run_bnb(Ctx& c, int64_t n_tokens, int64_t row_begin, int64_t row_end, float* y, int64_t ldy) {
  const WeightView& w = *c.w;
  const __m512i book = bnb_book16(w.type);
  const auto row_ptr = [&](int64_t o) { return w.data + static_cast<size_t>(o) * w.row_bytes; };
  if (n_tokens == 1) {
    pair_rows(
        row_begin, row_end,
        [&](int64_t o0, int64_t o1) {
          if (w.double_quant) {
            bnb_decode_row2<true>(c, row_ptr(o0), row_ptr(o1), book, y + o0, y + o1);
          } else {
            bnb_decode_row2<false>(c, row_ptr(o0), row_ptr(o1), book, y + o0, y + o1);
          }
        });
    return;
  }
  const int64_t nb = c.cols / 64;
  float* absmax_buf = static_cast<float*>(detail::qgemm_scratch(7, static_cast<size_t>(kBnbTileRows * (nb + 16)) * sizeof(float)));
  int64_t prepared = -1;  // first row of the 4 whose absmax are in absmax_buf
  const auto prepare = [&](int64_t o, int mr) {
    if (prepared == o) return;
    for (int r = 0; r < mr; ++r) {
      for (int64_t b0 = 0; b0 < nb; b0 += 16) bnb_absmax16(row_ptr(o + r), nb, b0, w.double_quant, absmax_buf + r * (nb + 16) + b0);
    }
    prepared = o;
  };
  const auto tile = [&](auto mr_c, auto nr_c, int64_t o, int64_t t) {
    constexpr int MR = decltype(mr_c)::value, NR = decltype(nr_c)::value;
    prepare(o, MR);
    const uint8_t* codes[MR];
    const float* absmax[MR];
    for (int r = 0; r < MR; ++r) {
      codes[r] = bnb_block_codes(row_ptr(o + r), nb, 0, w.double_quant);
      absmax[r] = absmax_buf + r * (nb + 16);
    }
    bnb_tile<MR, NR>(c, codes, absmax, t, y + o, ldy, book);
  };
  run_tiles<kBnbTileRows, kBnbTileTokens>(n_tokens, row_begin, row_end, tile);
}

void run_q4_0(Ctx& c, int64_t n_tokens, int64_t row_begin, int64_t row_end, float* y, int64_t ldy) {
  const WeightView& w = *c.w;
  const auto row_ptr = [&](int64_t o) { return w.data + static_cast<size_t>(o) * w.row_bytes; };
  if (n_tokens == 1) {
    pair_rows(row_begin, row_end, [&](int64_t o0, int64_t o1) { q4_0_decode_row2(c, row_ptr(o0), row_ptr(o1), y + o0, y + o1); });
    return;
  }
  const auto tile = [&](auto mr_c, auto nr_c, int64_t o, int64_t t) {
    constexpr int MR = decltype(mr_c)::value, NR = decltype(nr_c)::value;
    const uint8_t* rows[MR];
    for (int r = 0; r < MR; ++r) rows[r] = row_ptr(o + r);
    q4_0_tile<MR, NR>(c, rows, t, y + o, ldy);
  };
  run_tiles<2, 6>(n_tokens, row_begin, row_end, tile);
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

// nf4/fp4: int16 activations per 64 columns, [odd columns | even columns].
void build_bnb_activations(Ctx& c) {
  const ActQ& a = c.a;
  int16_t* x16 = static_cast<int16_t*>(detail::qgemm_scratch(5, static_cast<size_t>(a.n_tokens * c.cols_pad) * sizeof(int16_t)));
  for (int64_t t = 0; t < a.n_tokens; ++t) {
    const int8_t* q = a.qt(t);
    int16_t* out = x16 + t * c.cols_pad;
    for (int64_t b = 0; b < c.cols_pad / 64; ++b) {
      for (int k = 0; k < 32; ++k) {
        out[64 * b + k] = q[64 * b + 2 * k + 1];
        out[64 * b + 32 + k] = q[64 * b + 2 * k];
      }
    }
  }
  c.x16 = x16;
}

// q4_0: units of 4 blocks.
void build_q4_0_activations(Ctx& c) {
  const ActQ& a = c.a;
  c.units = (c.cols / 32 + 3) / 4;
  const int64_t n = a.n_tokens, units = c.units;
  int8_t* qxu = static_cast<int8_t*>(detail::qgemm_scratch(5, static_cast<size_t>(n * units * 128)));
  float* eu = static_cast<float*>(detail::qgemm_scratch(6, static_cast<size_t>(n * units * 32) * sizeof(float)));
  float* cu = eu + n * units * 16;
  for (int64_t t = 0; t < n; ++t) {
    const int8_t* q = a.qt(t);
    for (int64_t u = 0; u < units; ++u) {
      int8_t* x = qxu + (t * units + u) * 128;
      float* e = eu + (t * units + u) * 16;
      float* cc = cu + (t * units + u) * 16;
      for (int k = 0; k < 4; ++k) {
        const int64_t b = 4 * u + k;
        const bool live = b < a.nblk;
        for (int i = 0; i < 16; ++i) {
          x[16 * k + i] = live ? q[32 * b + i] : 0;
          x[64 + 16 * k + i] = live ? q[32 * b + 16 + i] : 0;
        }
        const float d = live ? a.dt(t)[b] : 0.0f;
        const float corr = live ? -8.0f * d * static_cast<float>(a.st(t)[b]) / 4.0f : 0.0f;
        for (int i = 0; i < 4; ++i) {
          e[4 * k + i] = d;
          cc[4 * k + i] = corr;
        }
      }
    }
  }
  c.qxu = qxu;
  c.eu = eu;
  c.cu = cu;
}

}  // namespace

namespace detail {

void qgemm_avx512(const float* x, int64_t ldx, int64_t n_tokens, const WeightView& w, int64_t row_begin,
                  int64_t row_end, float* y, int64_t ldy, uint64_t x_key) {
  // What this thread prepared last (scratch slots 0-6): the quantized activations under `key`, and
  // the lanes / format-specific layouts for `type`. A call without a key invalidates both.
  struct Prepared {
    uint64_t key = 0;
    int64_t cols = 0, n_tokens = 0;
    bool has_lanes = false;
    QuantType type = QuantType::F32;
    Ctx c{};
  };
  thread_local Prepared last;
  const bool same_x = x_key != 0 && last.key == x_key && last.cols == w.cols && last.n_tokens == n_tokens;
  Ctx c{};
  if (same_x && last.has_lanes && last.type == w.type) {
    c = last.c;
  } else {
    c.cols = w.cols;
    c.cols_pad = round_up(w.cols, 64);
    c.groups = c.cols_pad / 64;
    c.nlanes = c.cols_pad / 4;
    c.a = same_x ? last.c.a : quantize_activations_512(x, ldx, n_tokens, w.cols);
    build_lanes(c, w.type);
    if (w.type == QuantType::NF4 || w.type == QuantType::FP4) build_bnb_activations(c);
    if (w.type == QuantType::Q4_0) build_q4_0_activations(c);
    last = Prepared{x_key, w.cols, n_tokens, true, w.type, c};
  }
  c.w = &w;
  if (w.type == QuantType::NF4 || w.type == QuantType::FP4) return run_bnb(c, n_tokens, row_begin, row_end, y, ldy);
  if (w.type == QuantType::Q4_0) return run_q4_0(c, n_tokens, row_begin, row_end, y, ldy);
  switch (w.type) {
    case QuantType::Q8_0: return run_int<FmtQ8_0>(c, n_tokens, row_begin, row_end, y, ldy);
    case QuantType::Q4_K: return run_int<FmtQ4_K>(c, n_tokens, row_begin, row_end, y, ldy);
    case QuantType::Q5_K: return run_int<FmtQ5_K>(c, n_tokens, row_begin, row_end, y, ldy);
    case QuantType::Q6_K: return run_int<FmtQ6_K>(c, n_tokens, row_begin, row_end, y, ldy);
    case QuantType::INT8: return run_int<FmtInt8>(c, n_tokens, row_begin, row_end, y, ldy);
    default: return;
  }
}

}  // namespace detail
}  // namespace bioquant
