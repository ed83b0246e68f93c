// Compiled with -ffp-contract=off (CMakeLists.txt): every exact:: operation rounds on its own.
#include "bioquant/kernels/cpu/exact_ops.h"

#include <algorithm>
#include <vector>

#include "bioquant/core/error.h"
#include "bioquant/kernels/exact.h"

namespace bioquant::exact {
namespace {

// The hot loops of the quantized matmul, cloned for AVX-512 and AVX2 (GCC picks one at load time):
// only the integer dot products vectorise; every float operation is the same scalar IEEE operation
// in each clone (-ffp-contract=off, no reassociation), so the results do not depend on the clone.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BQ_EXACT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BQ_EXACT_CLONES
#endif

BQ_EXACT_CLONES void decode_row(QuantType t, const uint8_t* row, int64_t cols, int64_t nblk, bool dq, const int16_t* book,
                                const float* dynamic_map, Levels* levels) {
  for (int64_t b = 0; b < nblk; ++b) {
    levels[b] = Levels{};
    decode_block(t, row, cols, b, dq, book, dynamic_map, levels[b]);
  }
}

BQ_EXACT_CLONES float row_sum(const Levels* levels, int64_t nblk, const int8_t* qt, const float* dt) {
  return canonical_sum<float>(nblk, [&](int64_t b) { return block_term(levels[b], qt + 32 * b, dt[b]); });
}

}  // namespace

void rms_norm(const float* x, const float* w, float eps, int64_t rows, int64_t n, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    float* o = out + r * n;
    const double ss = canonical_sum<double>(n, [&](int64_t i) {
      const double v = static_cast<double>(xr[i]);
      return mul(v, v);
    });
    const float scale = rms_scale(ss, n, eps);
    for (int64_t i = 0; i < n; ++i) o[i] = mul(mul(xr[i], scale), w[i]);
  }
}

void matmul(const float* x, int64_t n_tokens, const Matrix& w, float* y, ThreadPool& pool) {
  check(w.data != nullptr, "exact numerics: matrix weights are not in host memory");
  const bool plain = w.type == QuantType::F32 || w.type == QuantType::F16 || w.type == QuantType::BF16;
  const size_t rb = w.row_bytes();
  const int64_t cols = w.cols, rows = w.rows;
  // Rows in chunks of 16 (a row's result does not depend on the split).
  const size_t chunks = static_cast<size_t>((rows + 15) / 16);
  if (plain) {
    pool.parallel_for(chunks, [&](size_t ci) {
      for (int64_t o = static_cast<int64_t>(ci) * 16; o < std::min(rows, static_cast<int64_t>(ci) * 16 + 16); ++o) {
        const uint8_t* row = w.data + static_cast<size_t>(o) * rb;
        for (int64_t t = 0; t < n_tokens; ++t) {
          const float* xt = x + t * cols;
          y[t * rows + o] = canonical_sum<float>(cols, [&](int64_t i) { return mul(plain_value(w.type, row, i), xt[i]); });
        }
      }
    });
    return;
  }
  check(!(w.type == QuantType::INT8 && w.outlier_threshold > 0.0f),
        "exact numerics have no LLM.int8 outlier decomposition: leave --int8-threshold at 0");
  const int64_t nblk = (cols + 31) / 32;
  std::vector<int8_t> qx(static_cast<size_t>(n_tokens * nblk * 32));
  std::vector<float> dx(static_cast<size_t>(n_tokens * nblk));
  for (int64_t t = 0; t < n_tokens; ++t)
    for (int64_t b = 0; b < nblk; ++b)
      dx[static_cast<size_t>(t * nblk + b)] =
          quantize_block(x + t * cols + 32 * b, std::min<int64_t>(32, cols - 32 * b), qx.data() + (t * nblk + b) * 32);
  int16_t book[16] = {};
  if (w.type == QuantType::NF4 || w.type == QuantType::FP4) bnb_codebook_q14(w.type, book);
  const float* dynamic_map = bnb_dynamic_map();
  pool.parallel_for(chunks, [&](size_t ci) {
    std::vector<Levels> levels(static_cast<size_t>(nblk));
    for (int64_t o = static_cast<int64_t>(ci) * 16; o < std::min(rows, static_cast<int64_t>(ci) * 16 + 16); ++o) {
      const uint8_t* row = w.data + static_cast<size_t>(o) * rb;
      decode_row(w.type, row, cols, nblk, w.double_quant, book, dynamic_map, levels.data());
      for (int64_t t = 0; t < n_tokens; ++t)
        y[t * rows + o] = finish_row(w.type, row, row_sum(levels.data(), nblk, qx.data() + t * nblk * 32, dx.data() + t * nblk));
    }
  });
}

void rope_table(int64_t pos, const float* inv_freq, int64_t half, float scale, float* cos, float* sin) {
  for (int64_t i = 0; i < half; ++i) {
    sin_cos(mul(to_float(pos), inv_freq[i]), &sin[i], &cos[i]);
    sin[i] = mul(sin[i], scale);
    cos[i] = mul(cos[i], scale);
  }
}

void rope(float* head, int64_t rotary_dim, const float* cos, const float* sin) {
  const int64_t half = rotary_dim / 2;
  for (int64_t i = 0; i < half; ++i) rope_pair(head[i], head[i + half], cos[i], sin[i]);
}

void attention_head(const float* q, const float* k, const float* v, int64_t kv_stride, int64_t len, int64_t head_dim,
                    float scale, float cap, float* scores, float* out) {
  float m = 0.0f;
  for (int64_t s = 0; s < len; ++s) {
    const float* ks = k + s * kv_stride;
    float sc = mul(canonical_sum<float>(head_dim, [&](int64_t i) { return mul(q[i], ks[i]); }), scale);
    if (cap > 0.0f) sc = exact::softcap(sc, cap);
    scores[s] = sc;
    m = s == 0 || sc > m ? sc : m;
  }
  for (int64_t s = 0; s < len; ++s) scores[s] = exp_f(sub(scores[s], m));
  const double total = canonical_sum<double>(len, [&](int64_t s) { return static_cast<double>(scores[s]); });
  const float inv = to_float(div(1.0, total));
  for (int64_t s = 0; s < len; ++s) scores[s] = mul(scores[s], inv);
  for (int64_t i = 0; i < head_dim; ++i) {
    float o = 0.0f;
    for (int64_t s = 0; s < len; ++s) o = add(o, mul(scores[s], v[s * kv_stride + i]));
    out[i] = o;
  }
}

void act_mul(float* a, const float* b, int64_t n, bool gelu) {
  for (int64_t i = 0; i < n; ++i) a[i] = gelu ? gelu_tanh_mul(a[i], b[i]) : silu_mul(a[i], b[i]);
}

void softcap(float* x, int64_t n, float cap) {
  for (int64_t i = 0; i < n; ++i) x[i] = exact::softcap(x[i], cap);
}

}  // namespace bioquant::exact
