// Register-tiled dot-product GEMM shared by the ISA translation units. Each includes this
// inside its own anonymous namespace after defining `struct V` (vector width and loads), so
// no symbol compiled with wider instructions can leak into another unit.
//
// Tiles of MR weight rows x NR tokens keep MR*NR accumulators in registers; each weight
// vector is converted to f32 once per tile and reused NR times. Accumulation is f32.

template <class W>
struct WeightLoad;

struct F32Weights {};
struct BF16Weights {};
struct F16Weights {};

template <>
struct WeightLoad<F32Weights> {
  using Elem = float;
  static typename V::Reg load(const Elem* p) { return V::load_f32(p); }
  static float scalar(const Elem* p) { return *p; }
};
template <>
struct WeightLoad<BF16Weights> {
  using Elem = uint16_t;
  static typename V::Reg load(const Elem* p) { return V::load_bf16(p); }
  static float scalar(const Elem* p) { return scalar_bf16(*p); }
};
template <>
struct WeightLoad<F16Weights> {
  using Elem = uint16_t;
  static typename V::Reg load(const Elem* p) { return V::load_f16(p); }
  static float scalar(const Elem* p) { return scalar_f16(*p); }
};

template <class W, int MR, int NR>
inline void gemm_tile(const float* x, int64_t ldx, const uint8_t* w, size_t row_bytes, int64_t k, float* y,
                      int64_t ldy) {
  using L = WeightLoad<W>;
  using E = typename L::Elem;
  typename V::Reg acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int t = 0; t < NR; ++t) acc[r][t] = V::zero();
  const E* rows[MR];
  for (int r = 0; r < MR; ++r) rows[r] = reinterpret_cast<const E*>(w + r * row_bytes);
  const int64_t k_vec = k - k % V::kWidth;
  for (int64_t i = 0; i < k_vec; i += V::kWidth) {
    typename V::Reg wv[MR];
    for (int r = 0; r < MR; ++r) wv[r] = L::load(rows[r] + i);
    for (int t = 0; t < NR; ++t) {
      const typename V::Reg xv = V::load_f32(x + t * ldx + i);
      for (int r = 0; r < MR; ++r) acc[r][t] = V::fma(wv[r], xv, acc[r][t]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int t = 0; t < NR; ++t) {
      float s = V::hsum(acc[r][t]);
      for (int64_t i = k_vec; i < k; ++i) s += L::scalar(rows[r] + i) * x[t * ldx + i];
      y[t * ldy + r] = s;
    }
  }
}

// Token chunks keep a block of activations hot in L2 while every row of the task passes over it.
constexpr int64_t kTokenChunk = 64;

template <class W>
void gemm(const float* x, int64_t ldx, int64_t n_tokens, const uint8_t* w, size_t row_bytes, int64_t k,
          int64_t row_begin, int64_t row_end, float* y, int64_t ldy) {
  constexpr int MR = V::kTileRows;
  constexpr int NR = V::kTileTokens;
  if (n_tokens == 1) {  // decode: more rows in flight per pass over x
    int64_t o = row_begin;
    for (; o + 8 <= row_end; o += 8) gemm_tile<W, 8, 1>(x, ldx, w + o * row_bytes, row_bytes, k, y + o, ldy);
    for (; o < row_end; ++o) gemm_tile<W, 1, 1>(x, ldx, w + o * row_bytes, row_bytes, k, y + o, ldy);
    return;
  }
  for (int64_t t0 = 0; t0 < n_tokens; t0 += kTokenChunk) {
    const int64_t t1 = t0 + kTokenChunk < n_tokens ? t0 + kTokenChunk : n_tokens;
    int64_t o = row_begin;
    for (; o + MR <= row_end; o += MR) {
      const uint8_t* wr = w + o * row_bytes;
      int64_t t = t0;
      for (; t + NR <= t1; t += NR) gemm_tile<W, MR, NR>(x + t * ldx, ldx, wr, row_bytes, k, y + t * ldy + o, ldy);
      for (; t < t1; ++t) gemm_tile<W, MR, 1>(x + t * ldx, ldx, wr, row_bytes, k, y + t * ldy + o, ldy);
    }
    for (; o < row_end; ++o) {
      const uint8_t* wr = w + o * row_bytes;
      for (int64_t t = t0; t < t1; ++t) gemm_tile<W, 1, 1>(x + t * ldx, ldx, wr, row_bytes, k, y + t * ldy + o, ldy);
    }
  }
}

void gemm_f32(const float* x, int64_t ldx, int64_t n, const uint8_t* w, size_t rb, int64_t k, int64_t r0,
              int64_t r1, float* y, int64_t ldy) {
  gemm<F32Weights>(x, ldx, n, w, rb, k, r0, r1, y, ldy);
}
void gemm_bf16(const float* x, int64_t ldx, int64_t n, const uint8_t* w, size_t rb, int64_t k, int64_t r0,
               int64_t r1, float* y, int64_t ldy) {
  gemm<BF16Weights>(x, ldx, n, w, rb, k, r0, r1, y, ldy);
}
void gemm_f16(const float* x, int64_t ldx, int64_t n, const uint8_t* w, size_t rb, int64_t k, int64_t r0,
              int64_t r1, float* y, int64_t ldy) {
  gemm<F16Weights>(x, ldx, n, w, rb, k, r0, r1, y, ldy);
}

float dot(const float* a, const float* b, int64_t n) {
  typename V::Reg acc0 = V::zero(), acc1 = V::zero();
  int64_t i = 0;
  for (; i + 2 * V::kWidth <= n; i += 2 * V::kWidth) {
    acc0 = V::fma(V::load_f32(a + i), V::load_f32(b + i), acc0);
    acc1 = V::fma(V::load_f32(a + i + V::kWidth), V::load_f32(b + i + V::kWidth), acc1);
  }
  for (; i + V::kWidth <= n; i += V::kWidth) acc0 = V::fma(V::load_f32(a + i), V::load_f32(b + i), acc0);
  float s = V::hsum(V::add(acc0, acc1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

void axpy(float alpha, const float* x, float* y, int64_t n) {
  const typename V::Reg av = V::broadcast(alpha);
  int64_t i = 0;
  for (; i + V::kWidth <= n; i += V::kWidth) V::store_f32(y + i, V::fma(av, V::load_f32(x + i), V::load_f32(y + i)));
  for (; i < n; ++i) y[i] += alpha * x[i];
}

double sum_read(const float* data, int64_t n) {
  typename V::Reg a0 = V::zero(), a1 = V::zero(), a2 = V::zero(), a3 = V::zero();
  int64_t i = 0;
  for (; i + 4 * V::kWidth <= n; i += 4 * V::kWidth) {
    a0 = V::add(a0, V::load_f32(data + i));
    a1 = V::add(a1, V::load_f32(data + i + V::kWidth));
    a2 = V::add(a2, V::load_f32(data + i + 2 * V::kWidth));
    a3 = V::add(a3, V::load_f32(data + i + 3 * V::kWidth));
  }
  double s = V::hsum(V::add(V::add(a0, a1), V::add(a2, a3)));
  for (; i < n; ++i) s += data[i];
  return s;
}
