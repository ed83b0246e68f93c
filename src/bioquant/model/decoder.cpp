#include "bioquant/model/decoder.h"

#include <algorithm>
#include <cmath>

#include "bioquant/core/error.h"
#include "bioquant/kernels/cpu/cpu_kernels.h"
#include "bioquant/kernels/cpu/exact_ops.h"
#include "bioquant/kernels/cpu/ops.h"
#include "bioquant/kernels/cuda/gpu_decoder.h"

namespace bioquant {

KVCache::KVCache(const ModelConfig& c, int64_t capacity)
    : capacity_(capacity), kv_dim_(c.kv_dim()), n_layers_(c.n_layers) {
  check(capacity > 0, "KV cache capacity must be positive");
}

void KVCache::ensure_host() {
  if (!k_.empty()) return;
  const size_t n = static_cast<size_t>(n_layers_ * capacity_ * kv_dim_);
  k_.resize(n);
  v_.resize(n);
}

namespace {
// longrope: whether a segment's step rotates with the long factors (forced, or by its last position).
bool takes_long_rope(const RopeParams& rope, const DecodeSegment& sg) {
  return sg.long_rope || rope_long_step(rope, sg.cache->size() + sg.n - 1);
}
}  // namespace

Decoder::Decoder(const Model& model, ThreadPool& pool, int device, KvType kv, bool exact)
    : model_(model), pool_(pool), exact_(exact) {
  const ModelConfig& c = model.config();
  const size_t half = static_cast<size_t>(c.rotary_dim() / 2);
  inv_freq_.resize(2 * half);
  rope_inv_freq(c.rope, c.rotary_dim(), inv_freq_.data());
  rope_inv_freq(c.rope, c.rotary_dim(), inv_freq_.data() + half, true);
  if (device >= 0) {
    gpu_ = std::make_unique<GpuDecoder>(model, device, kv, exact);
    gpu_->set_host_pool(&pool);
    return;
  }
  for (const auto& [name, m] : model.named_matrices())
    check(m->data != nullptr, "matrix " + name + " exists only on the GPU (synthetic weights made there): run with --device cuda");
}

Decoder::~Decoder() = default;

void Decoder::attention(int64_t layer, const float* q, const std::vector<Row>& rows, float* out) {
  const ModelConfig& c = model_.config();
  const int64_t d = c.head_dim, group = c.n_heads / c.n_kv_heads;
  const int64_t window = c.layer_sliding[static_cast<size_t>(layer)] ? c.sliding_window : 0;
  const float scale = c.attention_scale();
  const CpuKernels& k = cpu_kernels();
  const int64_t n = static_cast<int64_t>(rows.size());
  // One task per (head, row); a row attends over its own sequence's cache.
  pool_.parallel_for(static_cast<size_t>(c.n_heads * n), [&](size_t task) {
    const int64_t h = static_cast<int64_t>(task) / n, t = static_cast<int64_t>(task) % n;
    KVCache& cache = *rows[static_cast<size_t>(t)].cache;
    const int64_t pos = rows[static_cast<size_t>(t)].pos, g = h / group;
    // A sliding layer sees the `window` most recent positions, itself included.
    const int64_t first = window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0;
    const int64_t len = pos - first + 1;
    thread_local std::vector<float> scores;
    scores.resize(static_cast<size_t>(len));
    const float* qh = q + t * c.q_dim() + h * d;
    float* o = out + t * c.q_dim() + h * d;
    if (exact_) {
      exact::attention_head(qh, cache.k(layer, first) + g * d, cache.v(layer, first) + g * d, c.kv_dim(), len, d, scale,
                            c.attn_softcap, scores.data(), o);
      return;
    }
    for (int64_t s = 0; s < len; ++s) scores[s] = k.dot(qh, cache.k(layer, first + s) + g * d, d) * scale;
    if (c.attn_softcap > 0.0f) softcap(scores.data(), len, c.attn_softcap);
    softmax(scores.data(), len);
    std::fill(o, o + d, 0.0f);
    for (int64_t s = 0; s < len; ++s) k.axpy(scores[s], cache.v(layer, first + s) + g * d, o, d);
  });
}

void Decoder::forward(const int32_t* tokens, int64_t n, KVCache& cache, int64_t n_logits, float* logits) {
  const DecodeSegment segment{tokens, n, &cache, n_logits, logits};
  forward_batch(std::span<const DecodeSegment>(&segment, 1));
}

void Decoder::copy_prefix(const KVCache& from, KVCache& to, int64_t n) {
  check(&from != &to, "copy_prefix: the source and target are the same KV cache");
  check(n >= 0 && n <= from.size(), "copy_prefix: " + std::to_string(n) + " positions asked of a KV cache holding " +
                                        std::to_string(from.size()));
  check(n <= to.capacity(), "copy_prefix: " + std::to_string(n) + " positions exceed the KV cache of " +
                                std::to_string(to.capacity()));
  check(from.kv_dim_ == to.kv_dim_ && from.n_layers_ == to.n_layers_, "copy_prefix: KV caches of different models");
  if (n > 0) {
    if (gpu_) {
      gpu_->copy_prefix(from, to, n);
    } else {
      check(!from.k_.empty(), "copy_prefix: the source KV cache has no positions on this device");
      to.ensure_host();
      const size_t row = static_cast<size_t>(n * to.kv_dim_);
      for (int64_t l = 0; l < to.n_layers_; ++l) {
        const size_t src = static_cast<size_t>(l * from.capacity_ * from.kv_dim_);
        const size_t dst = static_cast<size_t>(l * to.capacity_ * to.kv_dim_);
        std::copy_n(from.k_.data() + src, row, to.k_.data() + dst);
        std::copy_n(from.v_.data() + src, row, to.v_.data() + dst);
      }
    }
  }
  to.size_ = n;
}

void Decoder::forward_batch(std::span<const DecodeSegment> segments) {
  const ModelConfig& c = model_.config();
  const ModelWeights& w = model_.weights();
  check(!segments.empty(), "forward: no sequences");
  int64_t n = 0, n_out = 0;  // stacked rows, rows that get logits
  for (size_t si = 0; si < segments.size(); ++si) {
    const DecodeSegment& sg = segments[si];
    check(sg.n > 0, "forward: no tokens");
    check(sg.n_logits >= 0 && sg.n_logits <= sg.n, "forward: n_logits out of range");
    check(sg.n_logits == 0 || sg.logits != nullptr || sg.top != nullptr, "forward: logits asked for without a buffer");
    check(sg.top == nullptr || sg.n_logits > 0, "forward: a top token needs n_logits > 0");
    check(sg.cache != nullptr, "forward: no KV cache");
    for (size_t sj = 0; sj < si; ++sj) check(segments[sj].cache != sg.cache, "forward: two sequences share a KV cache");
    const int64_t pos0 = sg.cache->size();
    // Messages built only on failure: these run for every token of every step.
    if (pos0 + sg.n > sg.cache->capacity())
      throw Error("context full: " + std::to_string(pos0 + sg.n) + " positions exceed the KV cache of " +
                  std::to_string(sg.cache->capacity()));
    for (int64_t t = 0; t < sg.n; ++t) {
      if (sg.tokens[t] < 0 || sg.tokens[t] >= c.vocab)
        throw Error("token id " + std::to_string(sg.tokens[t]) + " is outside the vocabulary [0, " +
                    std::to_string(c.vocab) + ")");
    }
    n += sg.n;
    n_out += sg.n_logits;
  }
  if (gpu_) {
    // Long prompts go through the GPU in rounds of at most prompt_chunk() tokens per sequence (its
    // workspace grows with the rows of a step: ~0.4 MB per token for a 70B shape). A failure rolls
    // the caches back to where they were.
    const int64_t chunk = gpu_->prompt_chunk(segments);
    std::vector<DecodeSegment> rest(segments.begin(), segments.end());
    for (DecodeSegment& sg : rest) sg.long_rope = takes_long_rope(c.rope, sg);
    std::vector<int64_t> sizes;
    for (const DecodeSegment& sg : segments) sizes.push_back(sg.cache->size());
    try {
      for (;;) {
        std::vector<DecodeSegment> round;
        for (DecodeSegment& sg : rest) {
          if (sg.n == 0) continue;
          DecodeSegment part = sg;
          if (chunk > 0 && sg.n > chunk && sg.n - chunk >= sg.n_logits) {  // logits come from the last round
            part.n = chunk;
            part.n_logits = 0;
            part.logits = nullptr;
            part.top = nullptr;
          }
          round.push_back(part);
          sg.tokens += part.n;
          sg.n -= part.n;
        }
        if (round.empty()) break;
        gpu_->forward_batch(round);
        for (const DecodeSegment& part : round) part.cache->size_ += part.n;
      }
    } catch (...) {
      for (size_t i = 0; i < segments.size(); ++i) segments[i].cache->size_ = sizes[i];
      throw;
    }
    return;
  }
  for (const DecodeSegment& sg : segments) sg.cache->ensure_host();
  // Row r of the stack: its sequence's cache and position.
  std::vector<Row> rows;
  rows.reserve(static_cast<size_t>(n));
  for (const DecodeSegment& sg : segments) {
    const bool long_rope = takes_long_rope(c.rope, sg);
    for (int64_t t = 0; t < sg.n; ++t) rows.push_back({sg.cache, sg.cache->size() + t, long_rope});
  }

  const int64_t hd = c.hidden, qd = c.q_dim(), kvd = c.kv_dim(), ff = c.intermediate, d = c.head_dim;
  std::vector<float> x(static_cast<size_t>(n * hd)), h(x.size()), q(static_cast<size_t>(n * qd)),
      attn(q.size()), kbuf(static_cast<size_t>(n * kvd)), vbuf(kbuf.size()), gate(static_cast<size_t>(n * ff)),
      up(gate.size());

  // Embeddings (Gemma scales them by sqrt(hidden), rounded as the compute dtype f32).
  const float embed_scale = c.embed_scale ? std::sqrt(static_cast<float>(hd)) : 1.0f;
  {
    int64_t t = 0;
    for (const DecodeSegment& sg : segments) {
      for (int64_t i = 0; i < sg.n; ++i, ++t) {
        w.embed.row_to_f32(sg.tokens[i], x.data() + t * hd);
        if (c.embed_scale)
          for (int64_t j = 0; j < hd; ++j) x[t * hd + j] *= embed_scale;
      }
    }
  }

  // cos/sin per row (each at its own sequence's position).
  const int64_t half = c.rotary_dim() / 2;
  std::vector<float> cos_tab(static_cast<size_t>(n * half)), sin_tab(cos_tab.size());
  const float rope_scale = c.rope.attention_factor;  // 1 but for longrope and yarn (x * 1 is exact)
  for (int64_t t = 0; t < n; ++t) {
    const Row& row = rows[static_cast<size_t>(t)];
    const float* inv_freq = inv_freq_.data() + (row.long_rope ? half : 0);
    if (exact_) {
      exact::rope_table(row.pos, inv_freq, half, rope_scale, cos_tab.data() + t * half, sin_tab.data() + t * half);
      continue;
    }
    for (int64_t i = 0; i < half; ++i) {
      const float angle = static_cast<float>(row.pos) * inv_freq[i];
      cos_tab[t * half + i] = std::cos(angle) * rope_scale;
      sin_tab[t * half + i] = std::sin(angle) * rope_scale;
    }
  }
  // The steps, in the default kernels or in exact numerics (kernels/exact.h).
  const auto norm = [&](const float* in, const std::vector<float>& weight, int64_t n_rows, int64_t width, float* out) {
    if (exact_) exact::rms_norm(in, weight.data(), c.norm_eps, n_rows, width, out);
    else rms_norm(in, weight.data(), c.norm_eps, n_rows, width, out);
  };
  const auto mat = [&](const float* in, int64_t n_rows, const Matrix& m, float* out) {
    if (exact_) exact::matmul(in, n_rows, m, out, pool_);
    else matmul(in, n_rows, m, out, pool_);
  };
  const auto mat_group = [&](const float* in, std::span<const MatmulJob> jobs) {
    if (!exact_) return matmul_group(in, n, jobs, pool_);
    for (const MatmulJob& j : jobs) exact::matmul(in, n, *j.w, j.y, pool_);
  };
  const auto rotate = [&](float* head, const float* cs, const float* sn) {
    if (exact_) exact::rope(head, c.rotary_dim(), cs, sn);
    else rope_rotate(head, c.rotary_dim(), cs, sn);
  };

  for (int64_t li = 0; li < c.n_layers; ++li) {
    const LayerWeights& l = w.layers[static_cast<size_t>(li)];
    norm(x.data(), l.attn_norm, n, hd, h.data());
    const MatmulJob qkv[] = {{&l.wq, q.data()}, {&l.wk, kbuf.data()}, {&l.wv, vbuf.data()}};
    mat_group(h.data(), qkv);
    if (!l.bq.empty()) {
      add_bias(q.data(), l.bq.data(), n, qd);
      add_bias(kbuf.data(), l.bk.data(), n, kvd);
      add_bias(vbuf.data(), l.bv.data(), n, kvd);
    }
    if (c.qk_norm) {
      norm(q.data(), l.q_norm, n * c.n_heads, d, q.data());
      norm(kbuf.data(), l.k_norm, n * c.n_kv_heads, d, kbuf.data());
    }
    for (int64_t t = 0; t < n; ++t) {
      const float* cs = cos_tab.data() + t * half;
      const float* sn = sin_tab.data() + t * half;
      for (int64_t hh = 0; hh < c.n_heads; ++hh) rotate(q.data() + t * qd + hh * d, cs, sn);
      for (int64_t hh = 0; hh < c.n_kv_heads; ++hh) rotate(kbuf.data() + t * kvd + hh * d, cs, sn);
      const Row& row = rows[static_cast<size_t>(t)];
      std::copy_n(kbuf.data() + t * kvd, kvd, row.cache->k(li, row.pos));
      std::copy_n(vbuf.data() + t * kvd, kvd, row.cache->v(li, row.pos));
    }
    attention(li, q.data(), rows, attn.data());
    mat(attn.data(), n, l.wo, h.data());
    if (!l.bo.empty()) add_bias(h.data(), l.bo.data(), n, hd);
    if (c.sandwich_norms) norm(h.data(), l.attn_post_norm, n, hd, h.data());
    for (size_t i = 0; i < x.size(); ++i) x[i] += h[i];

    norm(x.data(), l.ffn_norm, n, hd, h.data());
    const MatmulJob gate_up[] = {{&l.w_gate, gate.data()}, {&l.w_up, up.data()}};
    mat_group(h.data(), gate_up);
    if (!l.b_gate.empty()) {
      add_bias(gate.data(), l.b_gate.data(), n, ff);
      add_bias(up.data(), l.b_up.data(), n, ff);
    }
    if (exact_) {
      exact::act_mul(gate.data(), up.data(), n * ff, c.activation == Activation::GeluTanh);
    } else if (c.activation == Activation::GeluTanh) {
      gelu_tanh_mul(gate.data(), up.data(), n * ff);
    } else {
      silu_mul(gate.data(), up.data(), n * ff);
    }
    mat(gate.data(), n, l.w_down, h.data());
    if (!l.b_down.empty()) add_bias(h.data(), l.b_down.data(), n, hd);
    if (c.sandwich_norms) norm(h.data(), l.ffn_post_norm, n, hd, h.data());
    for (size_t i = 0; i < x.size(); ++i) x[i] += h[i];
  }
  for (const DecodeSegment& sg : segments) sg.cache->size_ += sg.n;

  if (n_out == 0) return;
  // The rows that get logits, gathered (a single segment's last rows are already contiguous).
  const float* last = x.data() + (n - n_out) * hd;
  std::vector<float> picked;
  if (segments.size() > 1) {
    picked.resize(static_cast<size_t>(n_out * hd));
    int64_t row = 0, out = 0;
    for (const DecodeSegment& sg : segments) {
      row += sg.n;
      std::copy_n(x.data() + (row - sg.n_logits) * hd, sg.n_logits * hd, picked.data() + out * hd);
      out += sg.n_logits;
    }
    last = picked.data();
  }
  norm(last, w.final_norm, n_out, hd, h.data());
  float* logits = segments.size() == 1 ? segments[0].logits : nullptr;
  std::vector<float> all;
  if (!logits) {  // several segments (gathered, then handed out), or one that wants its top token only
    all.resize(static_cast<size_t>(n_out * c.vocab));
    logits = all.data();
  }
  mat(h.data(), n_out, w.output, logits);
  if (c.final_softcap > 0.0f) {
    if (exact_) exact::softcap(logits, n_out * c.vocab, c.final_softcap);
    else softcap(logits, n_out * c.vocab, c.final_softcap);
  }
  int64_t out = 0;
  for (const DecodeSegment& sg : segments) {
    if (sg.logits != nullptr && sg.logits != logits) std::copy_n(logits + out * c.vocab, sg.n_logits * c.vocab, sg.logits);
    out += sg.n_logits;
    if (sg.top != nullptr) *sg.top = top_token(logits + (out - 1) * c.vocab, c.vocab);
  }
}

int32_t top_token(const float* logits, int64_t n) {
  // The maximum over 16 lanes (vectorised), then the first position holding it: about twice as fast as
  // std::max_element on a fresh 128K-logit row (memory-bound there).
  constexpr int kLanes = 16;
  if (n < 2 * kLanes) return static_cast<int32_t>(std::max_element(logits, logits + n) - logits);
  float lane_max[kLanes];
  std::copy_n(logits, kLanes, lane_max);
  int64_t i = kLanes;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lane_max[j] = logits[i + j] > lane_max[j] ? logits[i + j] : lane_max[j];
  float best = lane_max[0];
  for (int j = 1; j < kLanes; ++j) best = lane_max[j] > best ? lane_max[j] : best;
  for (; i < n; ++i) best = logits[i] > best ? logits[i] : best;
  for (int64_t k = 0; k < n; k += kLanes) {
    const int64_t end = std::min(n, k + kLanes);
    bool here = false;
    for (int64_t j = k; j < end; ++j) here |= logits[j] == best;
    if (here)
      for (int64_t j = k; j < end; ++j)
        if (logits[j] == best) return static_cast<int32_t>(j);
  }
  return 0;  // only NaN: none compares equal
}

}  // namespace bioquant
