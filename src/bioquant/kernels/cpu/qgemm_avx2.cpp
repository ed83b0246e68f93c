// AVX2 + FMA + F16C quantized matmul. Compiled with those flags only; chosen at run time.
//
// Same integers as the AVX-512 kernels, 32 columns at a time: vpmaddubsw (unsigned levels x int8
// activations, pairs to int16) then vpmaddwd by ones (int32 lanes of 4 products). q8_0 and int8
// levels are signed: |w| against sign(w) x keeps every pair sum within int16 (2 * 128 * 127).
// The nibble formats stay unsigned (offsets 8 / 32 and the K-quant mins come back through the
// activation sums), so their pairs are at most 2 * 63 * 127. nf4/fp4 look the Q1.14 codebook up
// with two vpshufb (low and high bytes) and multiply int16 x int16 with vpmaddwd.
// Decode streams one row at a time; prefill tiles 2 rows x 2 tokens.
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "bioquant/quant/quant.h"

namespace bioquant {
namespace {

float f16(uint16_t h) { return _cvtsh_ss(h); }

#include "bioquant/kernels/cpu/qgemm_impl.h"

struct Ctx {
  const WeightView* w;
  int64_t cols, cols_pad, groups;  // groups of 32 columns over cols_pad
  int64_t nlanes;                  // cols_pad / 4
  ActQ a;
  const float* e;     // [t * nlanes] activation scale per lane
  const float* c;     // [t * nlanes] offset correction per lane (q4_0, q6_k)
  const float* ds;    // [t * nblk] d * sum per block (K-quant mins)
  const int16_t* x16; // [t * cols_pad] nf4/fp4 int16 activations, per 32 columns
                      // [odd 0-7 | even 0-7 | odd 8-15 | even 8-15] (k-th odd column = 2k+1)
};

inline __m256i dot_u8s8(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}
// Signed x signed through the sign trick.
inline __m256i dot_s8s8(__m256i w, __m256i x) { return dot_u8s8(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w)); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Per-row state kept across the groups of a super-block.
struct Super {
  float ws[16];  // q4_k/q5_k: d*sc_j (8); q6_k: d*sc_k (16)
  float wm[8];   // q4_k/q5_k: -dmin*m_j
  const uint8_t* blk;
};

inline void kquant_super(const uint8_t* blk, Super& st) {
  const float d = f16(load_u16(blk)), dmin = f16(load_u16(blk + 2));
  const uint8_t* q = blk + 4;
  for (int j = 0; j < 8; ++j) {
    int sc, m;
    if (j < 4) {
      sc = q[j] & 63;
      m = q[j + 4] & 63;
    } else {
      sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
      m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
    st.ws[j] = d * static_cast<float>(sc);
    st.wm[j] = -(dmin * static_cast<float>(m));
  }
  st.blk = blk;
}

// ---- formats: group g = columns 32g..32g+31. load() gives the levels, scale() the lane scales.
// kSigned: levels are int8 (sign trick, no offset); kBias: C lanes carry the offset; kSuper: state
// per super-block of 8 groups; kMins: K-quant min term per super-block.

struct FmtQ8_0 {
  static constexpr bool kSigned = true, kBias = false, kSuper = false, kMins = false;
  static void begin(const uint8_t*, int64_t, Super&) {}
  static __m256i load(const uint8_t* row, const Super&, int64_t g) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 34 * g + 2));
  }
  static __m256 scale(const uint8_t* row, const Super&, int64_t g) { return _mm256_set1_ps(f16(load_u16(row + 34 * g))); }
};

struct FmtQ4_0 {
  static constexpr bool kSigned = false, kBias = true, kSuper = false, kMins = false;
  static void begin(const uint8_t*, int64_t, Super&) {}
  static __m256i load(const uint8_t* row, const Super&, int64_t g) {
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 18 * g + 2));
    const __m256i z = _mm256_inserti128_si256(_mm256_castsi128_si256(q), _mm_srli_epi16(q, 4), 1);
    return _mm256_and_si256(z, _mm256_set1_epi8(0x0F));
  }
  static __m256 scale(const uint8_t* row, const Super&, int64_t g) { return _mm256_set1_ps(f16(load_u16(row + 18 * g))); }
};

struct FmtQ4_K {
  static constexpr bool kSigned = false, kBias = false, kSuper = true, kMins = true;
  static void begin(const uint8_t* row, int64_t sb, Super& st) { kquant_super(row + 144 * sb, st); }
  template <int J>
  static __m256i load(const Super& st) {
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(st.blk + 16 + 32 * (J / 2)));
    return _mm256_and_si256(J & 1 ? _mm256_srli_epi16(q, 4) : q, _mm256_set1_epi8(0x0F));
  }
  template <int J>
  static __m256 scale(const Super& st) { return _mm256_broadcast_ss(&st.ws[J]); }
};

struct FmtQ5_K {
  static constexpr bool kSigned = false, kBias = false, kSuper = true, kMins = true;
  static void begin(const uint8_t* row, int64_t sb, Super& st) { kquant_super(row + 176 * sb, st); }
  template <int J>
  static __m256i load(const Super& st) {
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(st.blk + 48 + 32 * (J / 2)));
    const __m256i lo = _mm256_and_si256(J & 1 ? _mm256_srli_epi16(q, 4) : q, _mm256_set1_epi8(0x0F));
    // Sub-block J takes bit J of qh[l] as +16: move it to bit 4.
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(st.blk + 16));
    __m256i hb;
    if constexpr (J < 4) hb = _mm256_slli_epi16(qh, 4 - J);
    else if constexpr (J == 4) hb = qh;
    else hb = _mm256_srli_epi16(qh, J - 4);
    return _mm256_or_si256(lo, _mm256_and_si256(hb, _mm256_set1_epi8(16)));
  }
  template <int J>
  static __m256 scale(const Super& st) { return _mm256_broadcast_ss(&st.ws[J]); }
};

struct FmtQ6_K {
  static constexpr bool kSigned = false, kBias = true, kSuper = true, kMins = false;
  static void begin(const uint8_t* row, int64_t sb, Super& st) {
    const uint8_t* blk = row + 210 * sb;
    const float d = f16(load_u16(blk + 208));
    for (int k = 0; k < 16; ++k) st.ws[k] = d * static_cast<float>(static_cast<int8_t>(blk[192 + k]));
    st.blk = blk;
  }
  template <int J>
  static __m256i load(const Super& st) {
    constexpr int h = J / 4, q = J % 4;
    const __m256i ql = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(st.blk + 64 * h + 32 * (q & 1)));
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(st.blk + 128 + 32 * h));
    const __m256i lo = _mm256_and_si256(q >= 2 ? _mm256_srli_epi16(ql, 4) : ql, _mm256_set1_epi8(0x0F));
    __m256i hb;  // bits 2q, 2q+1 of qh moved to bits 4, 5
    if constexpr (q == 0) hb = _mm256_slli_epi16(qh, 4);
    else if constexpr (q == 1) hb = _mm256_slli_epi16(qh, 2);
    else if constexpr (q == 2) hb = qh;
    else hb = _mm256_srli_epi16(qh, 2);
    return _mm256_or_si256(lo, _mm256_and_si256(hb, _mm256_set1_epi8(0x30)));
  }
  template <int J>
  static __m256 scale(const Super& st) {
    return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_broadcast_ss(&st.ws[2 * J])), _mm_broadcast_ss(&st.ws[2 * J + 1]), 1);
  }
};

struct FmtInt8 {
  static constexpr bool kSigned = true, kBias = false, kSuper = false, kMins = false;
  static void begin(const uint8_t*, int64_t, Super&) {}
  static __m256i load(const uint8_t* row, const Super&, int64_t g) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 4 + 32 * g));
  }
  static __m256 scale(const uint8_t*, const Super&, int64_t) { return _mm256_set1_ps(1.0f); }
};

template <class F>
inline __m256i group_dot(__m256i wv, const int8_t* x) {
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  if constexpr (F::kSigned) return dot_s8s8(wv, xv);
  else return dot_u8s8(wv, xv);
}

// One sub-group J (32 columns) of a K-quant super-block for MR rows x NR tokens.
template <class F, int MR, int NR, int J>
inline void kstep(const Ctx& c, const Super* st, int64_t t0, int64_t g, __m256 (&acc)[MR][NR]) {
  __m256i wv[MR];
  __m256 sv[MR];
  for (int r = 0; r < MR; ++r) {
    wv[r] = F::template load<J>(st[r]);
    sv[r] = F::template scale<J>(st[r]);
  }
  for (int t = 0; t < NR; ++t) {
    const int64_t tt = t0 + t;
    const __m256 ev = _mm256_loadu_ps(c.e + tt * c.nlanes + 8 * g);
    const int8_t* x = c.a.qt(tt) + 32 * g;
    for (int r = 0; r < MR; ++r) {
      const __m256 f = _mm256_cvtepi32_ps(group_dot<F>(wv[r], x));
      if constexpr (F::kBias) {
        acc[r][t] = _mm256_fmadd_ps(sv[r], _mm256_fmadd_ps(ev, f, _mm256_loadu_ps(c.c + tt * c.nlanes + 8 * g)), acc[r][t]);
      } else {
        acc[r][t] = _mm256_fmadd_ps(sv[r], _mm256_mul_ps(ev, f), acc[r][t]);
      }
    }
  }
}

// MR rows x NR tokens over the whole row (MR = NR = 1 is the decode path). Even and odd groups
// accumulate separately (two dependency chains).
template <class F, int MR, int NR>
void tile(const Ctx& c, const uint8_t* const* rows, int64_t t0, float* y, int64_t ldy) {
  __m256 acc0[MR][NR], acc1[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int t = 0; t < NR; ++t) acc0[r][t] = acc1[r][t] = _mm256_setzero_ps();
  Super st[MR];
  for (int r = 0; r < MR; ++r) st[r].blk = nullptr;
  const bool int8_tail = std::is_same_v<F, FmtInt8> && c.cols % 32 != 0;
  const auto step = [&](int64_t g, __m256 (&acc)[MR][NR]) {
    if constexpr (!F::kSuper) {
    __m256i wv[MR];
    __m256 sv[MR];
    for (int r = 0; r < MR; ++r) {
      if (int8_tail && g == c.groups - 1) {  // the last, short int8 group from a zero-padded copy
        alignas(32) uint8_t tail[32] = {};
        std::memcpy(tail, rows[r] + 4 + 32 * g, static_cast<size_t>(c.cols - 32 * g));
        wv[r] = _mm256_load_si256(reinterpret_cast<const __m256i*>(tail));
      } else {
        wv[r] = F::load(rows[r], st[r], g);
      }
      sv[r] = F::scale(rows[r], st[r], g);
    }
    for (int t = 0; t < NR; ++t) {
      const int64_t tt = t0 + t;
      const __m256 ev = _mm256_loadu_ps(c.e + tt * c.nlanes + 8 * g);
      const int8_t* x = c.a.qt(tt) + 32 * g;
      if constexpr (F::kBias) {
        const __m256 cv = _mm256_loadu_ps(c.c + tt * c.nlanes + 8 * g);
        for (int r = 0; r < MR; ++r) {
          const __m256 f = _mm256_cvtepi32_ps(group_dot<F>(wv[r], x));
          acc[r][t] = _mm256_fmadd_ps(sv[r], _mm256_fmadd_ps(ev, f, cv), acc[r][t]);
        }
      } else {
        for (int r = 0; r < MR; ++r) {
          const __m256 f = _mm256_cvtepi32_ps(group_dot<F>(wv[r], x));
          acc[r][t] = _mm256_fmadd_ps(sv[r], _mm256_mul_ps(ev, f), acc[r][t]);
        }
      }
    }
    }
  };
  if constexpr (F::kSuper) {
    for (int64_t sb = 0; sb < c.groups / 8; ++sb) {
      for (int r = 0; r < MR; ++r) F::begin(rows[r], sb, st[r]);
      kstep<F, MR, NR, 0>(c, st, t0, 8 * sb, acc0);
      kstep<F, MR, NR, 1>(c, st, t0, 8 * sb + 1, acc1);
      kstep<F, MR, NR, 2>(c, st, t0, 8 * sb + 2, acc0);
      kstep<F, MR, NR, 3>(c, st, t0, 8 * sb + 3, acc1);
      kstep<F, MR, NR, 4>(c, st, t0, 8 * sb + 4, acc0);
      kstep<F, MR, NR, 5>(c, st, t0, 8 * sb + 5, acc1);
      kstep<F, MR, NR, 6>(c, st, t0, 8 * sb + 6, acc0);
      kstep<F, MR, NR, 7>(c, st, t0, 8 * sb + 7, acc1);
      if constexpr (F::kMins) {
        for (int t = 0; t < NR; ++t) {
          const __m256 dv = _mm256_loadu_ps(c.ds + (t0 + t) * c.a.nblk + 8 * sb);
          for (int r = 0; r < MR; ++r) acc0[r][t] = _mm256_fmadd_ps(_mm256_loadu_ps(st[r].wm), dv, acc0[r][t]);
        }
      }
    }
  } else {
    int64_t g = 0;
    for (; g + 2 <= c.groups; g += 2) {
      step(g, acc0);
      step(g + 1, acc1);
    }
    if (g < c.groups) step(g, acc0);
  }
  for (int r = 0; r < MR; ++r) {
    for (int t = 0; t < NR; ++t) {
      float v = hsum(_mm256_add_ps(acc0[r][t], acc1[r][t]));
      if constexpr (std::is_same_v<F, FmtInt8>) v *= load_f32(rows[r]) / 127.0f;
      y[(t0 + t) * ldy + r] = v;
    }
  }
}

// ---- nf4 / fp4 ----

struct Book {
  __m256i lo, hi;  // low and high bytes of the Q1.14 codebook, in both 128-bit lanes
};

inline Book bnb_book(QuantType t) {
  int16_t tab[16];
  bnb_codebook_q14(t, tab);
  alignas(16) uint8_t lo[16], hi[16];
  for (int i = 0; i < 16; ++i) {
    lo[i] = static_cast<uint8_t>(tab[i] & 0xFF);
    hi[i] = static_cast<uint8_t>((tab[i] >> 8) & 0xFF);
  }
  return Book{_mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(lo))),
              _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(hi)))};
}

// Codebook words of the 32 columns coded by q[0..15]: w0 = [odd 0-7 | even 0-7], w1 = [odd 8-15 | even 8-15].
inline void bnb_words(const Book& book, const uint8_t* q, __m256i& w0, __m256i& w1) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  const __m128i m = _mm_set1_epi8(0x0F);
  const __m256i idx = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_and_si128(b, m)),
                                              _mm_and_si128(_mm_srli_epi16(b, 4), m), 1);
  const __m256i lob = _mm256_shuffle_epi8(book.lo, idx), hib = _mm256_shuffle_epi8(book.hi, idx);
  w0 = _mm256_unpacklo_epi8(lob, hib);
  w1 = _mm256_unpackhi_epi8(lob, hib);
}

template <int MR, int NR>
void bnb_tile(const Ctx& c, const uint8_t* const* rows, int64_t t0, float* y, int64_t ldy, const Book& book) {
  __m256 acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int t = 0; t < NR; ++t) acc[r][t] = _mm256_setzero_ps();
  const int64_t nb = c.cols / 64;
  const bool dq = c.w->double_quant;
  const int64_t stride = dq ? 33 : 36;
  const uint8_t* codes[MR];
  for (int r = 0; r < MR; ++r) codes[r] = bnb_block_codes(rows[r], nb, 0, dq);
  alignas(32) float absmax16[MR][16];
  for (int64_t b = 0; b < nb; ++b) {
    if (b % 16 == 0) {
      for (int r = 0; r < MR; ++r) bnb_absmax16(rows[r], nb, b, dq, absmax16[r]);
    }
    float absmax[MR];
    for (int r = 0; r < MR; ++r) absmax[r] = absmax16[r][b % 16];
    for (int h = 0; h < 2; ++h) {  // the two 32-column halves (activation blocks) of the block
      __m256i w0[MR], w1[MR];
      for (int r = 0; r < MR; ++r) bnb_words(book, codes[r] + stride * b + 16 * h, w0[r], w1[r]);
      for (int t = 0; t < NR; ++t) {
        const int16_t* x = c.x16 + (t0 + t) * c.cols_pad + 64 * b + 32 * h;
        const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
        const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16));
        const float dx = c.a.dt(t0 + t)[2 * b + h];
        for (int r = 0; r < MR; ++r) {
          const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(w0[r], x0), _mm256_madd_epi16(w1[r], x1));
          acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(dx * absmax[r]), acc[r][t]);
        }
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int t = 0; t < NR; ++t) y[(t0 + t) * ldy + r] = hsum(acc[r][t]) * kBnbCodeScale;
}

// ---- activation side ----

void build_lanes(Ctx& c, QuantType type) {
  const ActQ& a = c.a;
  const int64_t n = a.n_tokens;
  float* e = static_cast<float*>(detail::qgemm_scratch(4, static_cast<size_t>(n * c.nlanes) * sizeof(float)));
  float* cc = static_cast<float*>(detail::qgemm_scratch(5, static_cast<size_t>(n * c.nlanes) * sizeof(float)));
  float* ds = static_cast<float*>(detail::qgemm_scratch(6, static_cast<size_t>(n * a.nblk) * sizeof(float)));
  for (int64_t t = 0; t < n; ++t) {
    const float* d = a.dt(t);
    const int32_t* s = a.st(t);
    const int32_t* s16 = a.s16t(t);
    for (int64_t b = 0; b < a.nblk; ++b) {
      float* et = e + t * c.nlanes + 8 * b;
      float* ct = cc + t * c.nlanes + 8 * b;
      ds[t * a.nblk + b] = d[b] * static_cast<float>(s[b]);
      for (int i = 0; i < 8; ++i) {
        et[i] = d[b];
        if (type == QuantType::Q4_0) ct[i] = -8.0f * d[b] * static_cast<float>(s[b]) / 8.0f;
        else if (type == QuantType::Q6_K) ct[i] = -32.0f * d[b] * static_cast<float>(s16[2 * b + i / 4]) / 4.0f;
        else ct[i] = 0.0f;
      }
    }
  }
  c.e = e;
  c.c = cc;
  c.ds = ds;
}

void build_bnb_activations(Ctx& c) {
  const ActQ& a = c.a;
  int16_t* x16 = static_cast<int16_t*>(detail::qgemm_scratch(5, static_cast<size_t>(a.n_tokens * c.cols_pad) * sizeof(int16_t)));
  for (int64_t t = 0; t < a.n_tokens; ++t) {
    const int8_t* q = a.qt(t);
    int16_t* out = x16 + t * c.cols_pad;
    for (int64_t h = 0; h < c.cols_pad / 32; ++h) {
      const int8_t* qh = q + 32 * h;
      int16_t* o = out + 32 * h;
      for (int k = 0; k < 8; ++k) {
        o[k] = qh[2 * k + 1];
        o[8 + k] = qh[2 * k];
        o[16 + k] = qh[2 * (k + 8) + 1];
        o[24 + k] = qh[2 * (k + 8)];
      }
    }
  }
  c.x16 = x16;
}

constexpr int64_t kTokenChunk = 32;

template <class Tile2x2, class Tile2x1, class Tile1x2, class Tile1x1>
void run_tiles(int64_t n_tokens, int64_t row_begin, int64_t row_end, Tile2x2&& t22, Tile2x1&& t21, Tile1x2&& t12,
               Tile1x1&& t11) {
  if (n_tokens == 1) {  // decode: one row at a time, one sequential stream
    for (int64_t o = row_begin; o < row_end; ++o) t11(o, 0);
    return;
  }
  for (int64_t t0 = 0; t0 < n_tokens; t0 += kTokenChunk) {
    const int64_t t1 = imin(n_tokens, t0 + kTokenChunk);
    int64_t o = row_begin;
    for (; o + 2 <= row_end; o += 2) {
      int64_t t = t0;
      for (; t + 2 <= t1; t += 2) t22(o, t);
      for (; t < t1; ++t) t21(o, t);
    }
    for (; o < row_end; ++o) {
      int64_t t = t0;
      for (; t + 2 <= t1; t += 2) t12(o, t);
      for (; t < t1; ++t) t11(o, t);
    }
  }
}

template <class F>
void run_int(const Ctx& c, int64_t n_tokens, int64_t row_begin, int64_t row_end, float* y, int64_t ldy) {
  const WeightView& w = *c.w;
  const auto go = [&](auto mr_c, auto nr_c, int64_t o, int64_t t) {
    constexpr int MR = decltype(mr_c)::value, NR = decltype(nr_c)::value;
    const uint8_t* rows[MR];
    for (int r = 0; r < MR; ++r) rows[r] = w.data + static_cast<size_t>(o + r) * w.row_bytes;
    tile<F, MR, NR>(c, rows, t, y + o, ldy);
  };
  using I1 = std::integral_constant<int, 1>;
  using I2 = std::integral_constant<int, 2>;
  run_tiles(n_tokens, row_begin, row_end, [&](int64_t o, int64_t t) { go(I2{}, I2{}, o, t); },
            [&](int64_t o, int64_t t) { go(I2{}, I1{}, o, t); }, [&](int64_t o, int64_t t) { go(I1{}, I2{}, o, t); },
            [&](int64_t o, int64_t t) { go(I1{}, I1{}, o, t); });
}

void run_bnb(const Ctx& c, int64_t n_tokens, int64_t row_begin, int64_t row_end, float* y, int64_t ldy) {
  const WeightView& w = *c.w;
  const Book book = bnb_book(w.type);
  const auto go = [&](auto mr_c, auto nr_c, int64_t o, int64_t t) {
    constexpr int MR = decltype(mr_c)::value, NR = decltype(nr_c)::value;
    const uint8_t* rows[MR];
    for (int r = 0; r < MR; ++r) rows[r] = w.data + static_cast<size_t>(o + r) * w.row_bytes;
    bnb_tile<MR, NR>(c, rows, t, y + o, ldy, book);
  };
  using I1 = std::integral_constant<int, 1>;
  using I2 = std::integral_constant<int, 2>;
  run_tiles(n_tokens, row_begin, row_end, [&](int64_t o, int64_t t) { go(I2{}, I2{}, o, t); },
            [&](int64_t o, int64_t t) { go(I2{}, I1{}, o, t); }, [&](int64_t o, int64_t t) { go(I1{}, I2{}, o, t); },
            [&](int64_t o, int64_t t) { go(I1{}, I1{}, o, t); });
}

}  // namespace

namespace detail {

void qgemm_avx2(const float* x, int64_t ldx, int64_t n_tokens, const WeightView& w, int64_t row_begin, int64_t row_end,
                float* y, int64_t ldy) {
  Ctx c{};
  c.w = &w;
  c.cols = w.cols;
  c.a = quantize_activations(x, ldx, n_tokens, w.cols);
  c.cols_pad = c.a.cols_pad;
  c.nlanes = c.cols_pad / 4;
  // int8 rows may end inside a group: the kernel reads only ceil(cols/32) groups.
  c.groups = w.type == QuantType::INT8 ? (w.cols + 31) / 32 : w.cols / 32;
  build_lanes(c, w.type);
  switch (w.type) {
    case QuantType::Q8_0: return run_int<FmtQ8_0>(c, n_tokens, row_begin, row_end, y, ldy);
    case QuantType::Q4_0: return run_int<FmtQ4_0>(c, n_tokens, row_begin, row_end, y, ldy);
    case QuantType::Q4_K: return run_int<FmtQ4_K>(c, n_tokens, row_begin, row_end, y, ldy);
    case QuantType::Q5_K: return run_int<FmtQ5_K>(c, n_tokens, row_begin, row_end, y, ldy);
    case QuantType::Q6_K: return run_int<FmtQ6_K>(c, n_tokens, row_begin, row_end, y, ldy);
    case QuantType::INT8: return run_int<FmtInt8>(c, n_tokens, row_begin, row_end, y, ldy);
    case QuantType::NF4:
    case QuantType::FP4:
      build_bnb_activations(c);
      return run_bnb(c, n_tokens, row_begin, row_end, y, ldy);
    default: return;
  }
}

}  // namespace detail
}  // namespace bioquant
