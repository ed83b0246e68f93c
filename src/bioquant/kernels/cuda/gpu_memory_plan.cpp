#include "bioquant/kernels/cuda/gpu_memory_plan.h"

#include <algorithm>
#include <vector>

#include "bioquant/model/model.h"

namespace bioquant {

namespace {

size_t aligned(size_t n) { return (n + 255) / 256 * 256; }

}  // namespace

size_t GpuWorkSizes::bytes() const {
  int64_t floats = 0;
  for (int64_t n : {x, x2, h, q, k, v, attn, normed, gate, up, logits, aq, ad, as, pos, attn_part, attn_done, top}) floats += n;
  return static_cast<size_t>(floats) * sizeof(float);
}

GpuWorkSizes gpu_work_sizes(const ModelConfig& c, int64_t tokens, int64_t logit_rows, int attention_splits) {
  const int64_t widest = std::max({c.hidden, c.q_dim(), c.intermediate});
  const int64_t nblk = (widest + 31) / 32;
  GpuWorkSizes s;
  s.x = tokens * c.hidden;
  s.x2 = std::min(tokens, kGpuSlicedNormRows) * c.hidden;
  s.h = tokens * std::max(c.hidden, c.q_dim());
  s.q = tokens * c.q_dim();
  s.k = tokens * c.kv_dim();
  s.v = tokens * c.kv_dim();
  s.attn = tokens * c.q_dim();
  // The norm's output is read by the matmuls right after it, never while attention output is live.
  s.normed = c.q_dim() >= c.hidden ? 0 : tokens * c.hidden;
  s.gate = tokens * c.intermediate;
  s.up = tokens * c.intermediate;
  s.logits = logit_rows * c.vocab;
  s.aq = (tokens * nblk * 32 + 3) / 4;
  s.ad = tokens * nblk;
  s.as = tokens * nblk;
  s.pos = 2 * tokens;  // one first position (int64) per sequence of a batch
  s.attn_part = c.n_heads * attention_splits * (c.head_dim + 2);
  s.attn_done = c.n_heads;
  s.top = logit_rows;
  return s;
}

int gpu_attention_splits(int sms, int n_heads) {
  return std::clamp(4 * sms / std::max(n_heads, 1), 1, kGpuMaxAttentionSplits);
}

void gpu_kv_sizes(const ModelConfig& c, int64_t capacity, KvType kv, size_t& values_bytes, size_t& scale_bytes) {
  const size_t elem = kv == KvType::F32 ? 4 : kv == KvType::BF16 ? 2 : 1;
  const size_t values = static_cast<size_t>(c.n_layers * capacity * c.kv_dim());
  values_bytes = values * elem;
  scale_bytes = kv == KvType::Q8 ? values / 32 * 2 : 0;  // one fp16 scale per 32 values
}

size_t gpu_weight_bytes(const Model& model, const std::function<size_t(const Matrix&)>& matrix_bytes) {
  const ModelConfig& c = model.config();
  const ModelWeights& w = model.weights();
  const auto matrix = [&](const Matrix& m) { return m.rows > 0 ? aligned(matrix_bytes(m) + kGpuMatrixTail) : 0; };
  const auto vec = [](size_t floats) { return aligned(floats * sizeof(float)); };
  size_t total = matrix(w.output) + vec(w.final_norm.size()) + vec(static_cast<size_t>(c.rotary_dim() / 2));
  for (const LayerWeights& l : w.layers) {
    for (const Matrix* m : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) total += matrix(*m);
    for (const std::vector<float>* v : {&l.bq, &l.bk, &l.bv, &l.bo, &l.b_gate, &l.b_up, &l.b_down, &l.attn_norm,
                                        &l.attn_post_norm, &l.ffn_norm, &l.ffn_post_norm, &l.q_norm, &l.k_norm})
      total += vec(v->size());
  }
  return total;
}

size_t gpu_gemm_tile_bytes(size_t model_weight_bytes) {
  // Measured on an H100, 8B q4_k pp512: 64 MB 18.5k tok/s, 48 MB 17.7k, 32 MB 14.1k; a 70B model gets 32 MB
  // (7% slower prompts than 48 MB) to keep its prompt workspace small.
  return (model_weight_bytes > (size_t{24} << 30) ? size_t{32} : size_t{64}) << 20;
}

int64_t gpu_gemm_tile_rows(int64_t rows, int64_t cols, size_t tile_bytes) {
  return std::min(rows, std::max<int64_t>(128, static_cast<int64_t>(tile_bytes) / (2 * cols) / 128 * 128));
}

}  // namespace bioquant
