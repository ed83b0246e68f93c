// Shared parts of the quantized matmul kernels (qgemm_{scalar,avx2,avx512}.cpp). Each unit
// includes this inside its own anonymous namespace after defining `float f16(uint16_t)`, so no
// code compiled with wider instructions leaks into another unit (see gemm_impl.h).
//
// Activation quantization (every ISA, bit for bit): per token, blocks of 32 columns (the last
// one shorter when cols % 32 != 0, int8 only), d = absmax/127, q = round-half-even(x * (1/d)),
// plus the integer sums of each 32 and each 16 quants (for the offset/min terms). Storage is
// padded to a multiple of 64 columns with zero quants, zero scales and zero sums.

struct ActQ {
  int64_t n_tokens = 0, cols = 0;
  int64_t cols_pad = 0;  // multiple of 64
  int64_t nblk = 0;      // blocks of 32 in cols_pad
  int8_t* q = nullptr;   // [t * cols_pad]
  float* d = nullptr;    // [t * nblk]
  int32_t* s = nullptr;  // [t * nblk], sum of the 32 quants
  int32_t* s16 = nullptr;  // [t * 2 * nblk], sums of the 16-quant halves
  const int8_t* qt(int64_t t) const { return q + t * cols_pad; }
  const float* dt(int64_t t) const { return d + t * nblk; }
  const int32_t* st(int64_t t) const { return s + t * nblk; }
  const int32_t* s16t(int64_t t) const { return s16 + t * 2 * nblk; }
};

// Round half to even for |v| < 2^22 (exact in every ISA: one float add and bit manipulation).
inline int32_t q_round(float v) {
  const float shifted = v + 12582912.0f;
  int32_t bits;
  std::memcpy(&bits, &shifted, sizeof bits);
  return (bits & 0x007fffff) - 0x00400000;
}

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

// The activation buffers for n_tokens rows of cols columns, in scratch slots 0-3.
inline ActQ activation_buffers(int64_t n_tokens, int64_t cols) {
  ActQ a;
  a.n_tokens = n_tokens;
  a.cols = cols;
  a.cols_pad = round_up(cols, 64);
  a.nblk = a.cols_pad / 32;
  a.q = static_cast<int8_t*>(detail::qgemm_scratch(0, static_cast<size_t>(n_tokens * a.cols_pad)));
  a.d = static_cast<float*>(detail::qgemm_scratch(1, static_cast<size_t>(n_tokens * a.nblk) * sizeof(float)));
  a.s = static_cast<int32_t*>(detail::qgemm_scratch(2, static_cast<size_t>(n_tokens * a.nblk) * sizeof(int32_t)));
  a.s16 = static_cast<int32_t*>(detail::qgemm_scratch(3, static_cast<size_t>(n_tokens * a.nblk * 2) * sizeof(int32_t)));
  return a;
}

// Quantizes n_tokens rows of x (cols each, ldx apart) into scratch slots 0-3.
inline ActQ quantize_activations(const float* x, int64_t ldx, int64_t n_tokens, int64_t cols) {
  ActQ a = activation_buffers(n_tokens, cols);
  for (int64_t t = 0; t < n_tokens; ++t) {
    const float* xt = x + t * ldx;
    int8_t* qt = a.q + t * a.cols_pad;
    float* dt = a.d + t * a.nblk;
    int32_t* st = a.s + t * a.nblk;
    int32_t* s16t = a.s16 + t * 2 * a.nblk;
    for (int64_t b = 0; b < a.nblk; ++b) {
      const int64_t c0 = b * 32;
      const int64_t n = c0 >= cols ? 0 : imin(32, cols - c0);
      float amax = 0.0f;
      for (int64_t i = 0; i < n; ++i) {
        const float v = xt[c0 + i] < 0 ? -xt[c0 + i] : xt[c0 + i];
        amax = v > amax ? v : amax;
      }
      const float d = amax / 127.0f;
      const float id = d != 0.0f ? 1.0f / d : 0.0f;
      int32_t lo = 0, hi = 0;
      for (int64_t i = 0; i < 32; ++i) {
        const int32_t q = i < n ? q_round(xt[c0 + i] * id) : 0;
        qt[c0 + i] = static_cast<int8_t>(q);
        if (i < 16) lo += q;
        else hi += q;
      }
      dt[b] = d;
      st[b] = lo + hi;
      s16t[2 * b] = lo;
      s16t[2 * b + 1] = hi;
    }
  }
  return a;
}

inline float load_f32(const uint8_t* p) {
  float v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Block absmax of nf4/fp4 block b of a row (double quantization decoded here).
inline float bnb_block_absmax(const uint8_t* row, int64_t nb, int64_t b, bool double_quant) {
  if (!double_quant) return load_f32(row + 36 * b);
  const int64_t ngroups = (nb + kBnbNested - 1) / kBnbNested;
  const float offset = load_f32(row);
  const float nested = load_f32(row + 4 + 4 * (b / kBnbNested));
  const uint8_t code = row[4 + 4 * ngroups + 33 * b];
  return bnb_dynamic_map()[code] * nested + offset;
}

// nf4/fp4 levels in Q1.14 (bnb_codebook_q14, quant.h): their scale back to the codebook.
constexpr float kBnbCodeScale = 1.0f / 16384.0f;

// Absmax of blocks b0..b0+15 (clamped to nb), double quant decoded, into out[16].
inline void bnb_absmax16(const uint8_t* row, int64_t nb, int64_t b0, bool dq, float* out) {
  const int64_t n = imin(16, nb - b0);
  if (!dq) {
    for (int64_t i = 0; i < n; ++i) out[i] = load_f32(row + 36 * (b0 + i));
    return;
  }
  const int64_t ngroups = (nb + kBnbNested - 1) / kBnbNested;
  const uint8_t* codes = row + 4 + 4 * ngroups + 33 * b0;
  const float offset = load_f32(row);
  const float nested = load_f32(row + 4 + 4 * (b0 / kBnbNested));  // 16 | 256: one group per chunk
  const float* map = bnb_dynamic_map();
  for (int64_t i = 0; i < n; ++i) out[i] = map[codes[33 * i]] * nested + offset;
}

// Pointer to the 32 code bytes of nf4/fp4 block b.
inline const uint8_t* bnb_block_codes(const uint8_t* row, int64_t nb, int64_t b, bool double_quant) {
  if (!double_quant) return row + 36 * b + 4;
  const int64_t ngroups = (nb + kBnbNested - 1) / kBnbNested;
  return row + 4 + 4 * ngroups + 33 * b + 1;
}
