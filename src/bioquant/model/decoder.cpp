#include "bioquant/model/decoder.h"

#include <algorithm>
#include <cmath>

#include "bioquant/core/error.h"
#include "bioquant/kernels/cpu/cpu_kernels.h"
#include "bioquant/kernels/cpu/ops.h"

namespace bioquant {

KVCache::KVCache(const ModelConfig& c, int64_t capacity) : capacity_(capacity), kv_dim_(c.kv_dim()) {
  check(capacity > 0, "KV cache capacity must be positive");
  const size_t n = static_cast<size_t>(c.n_layers * capacity * kv_dim_);
  k_.resize(n);
  v_.resize(n);
}

Decoder::Decoder(const Model& model, ThreadPool& pool) : model_(model), pool_(pool) {
  const ModelConfig& c = model.config();
  inv_freq_.resize(static_cast<size_t>(c.rotary_dim() / 2));
  rope_inv_freq(c.rope, c.rotary_dim(), inv_freq_.data());
}

void Decoder::attention(int64_t layer, const float* q, int64_t n, int64_t pos0, KVCache& cache, float* out) {
  const ModelConfig& c = model_.config();
  const int64_t d = c.head_dim, group = c.n_heads / c.n_kv_heads;
  const int64_t window = c.layer_sliding[static_cast<size_t>(layer)] ? c.sliding_window : 0;
  const float scale = c.attention_scale();
  const CpuKernels& k = cpu_kernels();
  // One task per (head, query position).
  pool_.parallel_for(static_cast<size_t>(c.n_heads * n), [&](size_t task) {
    const int64_t h = static_cast<int64_t>(task) / n, t = static_cast<int64_t>(task) % n;
    const int64_t pos = pos0 + t, g = h / group;
    // A sliding layer sees the `window` most recent positions, itself included.
    const int64_t first = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
    const int64_t len = pos - first + 1;
    thread_local std::vector<float> scores;
    scores.resize(static_cast<size_t>(len));
    const float* qh = q + t * c.q_dim() + h * d;
    for (int64_t s = 0; s < len; ++s) scores[s] = k.dot(qh, cache.k(layer, first + s) + g * d, d) * scale;
    if (c.attn_softcap > 0.0f) softcap(scores.data(), len, c.attn_softcap);
    softmax(scores.data(), len);
    float* o = out + t * c.q_dim() + h * d;
    std::fill(o, o + d, 0.0f);
    for (int64_t s = 0; s < len; ++s) k.axpy(scores[s], cache.v(layer, first + s) + g * d, o, d);
  });
}

void Decoder::forward(const int32_t* tokens, int64_t n, KVCache& cache, int64_t n_logits, float* logits) {
  const ModelConfig& c = model_.config();
  const ModelWeights& w = model_.weights();
  check(n > 0, "forward: no tokens");
  check(n_logits >= 0 && n_logits <= n, "forward: n_logits out of range");
  const int64_t pos0 = cache.size();
  check(pos0 + n <= cache.capacity(), "context full: " + std::to_string(pos0 + n) + " positions exceed the KV cache of " +
                                          std::to_string(cache.capacity()));
  for (int64_t t = 0; t < n; ++t) {
    check(tokens[t] >= 0 && tokens[t] < c.vocab,
          "token id " + std::to_string(tokens[t]) + " is outside the vocabulary [0, " + std::to_string(c.vocab) + ")");
  }
  const int64_t hd = c.hidden, qd = c.q_dim(), kvd = c.kv_dim(), ff = c.intermediate, d = c.head_dim;
  std::vector<float> x(static_cast<size_t>(n * hd)), h(x.size()), q(static_cast<size_t>(n * qd)),
      attn(q.size()), kbuf(static_cast<size_t>(n * kvd)), vbuf(kbuf.size()), gate(static_cast<size_t>(n * ff)),
      up(gate.size());

  // Embeddings (Gemma scales them by sqrt(hidden), rounded as the compute dtype f32).
  const float embed_scale = c.embed_scale ? std::sqrt(static_cast<float>(hd)) : 1.0f;
  for (int64_t t = 0; t < n; ++t) {
    w.embed.row_to_f32(tokens[t], x.data() + t * hd);
    if (c.embed_scale)
      for (int64_t i = 0; i < hd; ++i) x[t * hd + i] *= embed_scale;
  }

  // cos/sin per position of this batch.
  const int64_t half = c.rotary_dim() / 2;
  std::vector<float> cos_tab(static_cast<size_t>(n * half)), sin_tab(cos_tab.size());
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t i = 0; i < half; ++i) {
      const float angle = static_cast<float>(pos0 + t) * inv_freq_[i];
      cos_tab[t * half + i] = std::cos(angle);
      sin_tab[t * half + i] = std::sin(angle);
    }
  }

  for (int64_t li = 0; li < c.n_layers; ++li) {
    const LayerWeights& l = w.layers[static_cast<size_t>(li)];
    rms_norm(x.data(), l.attn_norm.data(), c.norm_eps, n, hd, h.data());
    matmul(h.data(), n, l.wq, q.data(), pool_);
    matmul(h.data(), n, l.wk, kbuf.data(), pool_);
    matmul(h.data(), n, l.wv, vbuf.data(), pool_);
    if (!l.bq.empty()) {
      add_bias(q.data(), l.bq.data(), n, qd);
      add_bias(kbuf.data(), l.bk.data(), n, kvd);
      add_bias(vbuf.data(), l.bv.data(), n, kvd);
    }
    if (c.qk_norm) {
      rms_norm(q.data(), l.q_norm.data(), c.norm_eps, n * c.n_heads, d, q.data());
      rms_norm(kbuf.data(), l.k_norm.data(), c.norm_eps, n * c.n_kv_heads, d, kbuf.data());
    }
    for (int64_t t = 0; t < n; ++t) {
      const float* cs = cos_tab.data() + t * half;
      const float* sn = sin_tab.data() + t * half;
      for (int64_t hh = 0; hh < c.n_heads; ++hh) rope_rotate(q.data() + t * qd + hh * d, c.rotary_dim(), cs, sn);
      for (int64_t hh = 0; hh < c.n_kv_heads; ++hh) rope_rotate(kbuf.data() + t * kvd + hh * d, c.rotary_dim(), cs, sn);
      std::copy_n(kbuf.data() + t * kvd, kvd, cache.k(li, pos0 + t));
      std::copy_n(vbuf.data() + t * kvd, kvd, cache.v(li, pos0 + t));
    }
    attention(li, q.data(), n, pos0, cache, attn.data());
    matmul(attn.data(), n, l.wo, h.data(), pool_);
    if (!l.bo.empty()) add_bias(h.data(), l.bo.data(), n, hd);
    if (c.sandwich_norms) rms_norm(h.data(), l.attn_post_norm.data(), c.norm_eps, n, hd, h.data());
    for (size_t i = 0; i < x.size(); ++i) x[i] += h[i];

    rms_norm(x.data(), l.ffn_norm.data(), c.norm_eps, n, hd, h.data());
    matmul(h.data(), n, l.w_gate, gate.data(), pool_);
    matmul(h.data(), n, l.w_up, up.data(), pool_);
    if (!l.b_gate.empty()) {
      add_bias(gate.data(), l.b_gate.data(), n, ff);
      add_bias(up.data(), l.b_up.data(), n, ff);
    }
    if (c.activation == Activation::GeluTanh) {
      gelu_tanh_mul(gate.data(), up.data(), n * ff);
    } else {
      silu_mul(gate.data(), up.data(), n * ff);
    }
    matmul(gate.data(), n, l.w_down, h.data(), pool_);
    if (!l.b_down.empty()) add_bias(h.data(), l.b_down.data(), n, hd);
    if (c.sandwich_norms) rms_norm(h.data(), l.ffn_post_norm.data(), c.norm_eps, n, hd, h.data());
    for (size_t i = 0; i < x.size(); ++i) x[i] += h[i];
  }
  cache.size_ = pos0 + n;

  if (n_logits == 0) return;
  const float* last = x.data() + (n - n_logits) * hd;
  rms_norm(last, w.final_norm.data(), c.norm_eps, n_logits, hd, h.data());
  matmul(h.data(), n_logits, w.output, logits, pool_);
  if (c.final_softcap > 0.0f) softcap(logits, n_logits * c.vocab, c.final_softcap);
}

}  // namespace bioquant
