// The one generic decoder forward pass, parameterised by ModelConfig's family traits,
// and its KV cache.
#pragma once
#include <cstdint>
#include <vector>

#include "bioquant/core/thread_pool.h"
#include "bioquant/model/model.h"

namespace bioquant {

// K and V of every processed position, f32, laid out [layer][position][kv_head][head_dim].
class KVCache {
 public:
  KVCache(const ModelConfig& config, int64_t capacity);

  int64_t capacity() const { return capacity_; }
  int64_t size() const { return size_; }  // positions filled so far
  void clear() { size_ = 0; }
  // Forgets every position from n on (prefix reuse: keep a shared prompt, drop what followed it).
  void truncate(int64_t n) { size_ = n < size_ ? (n < 0 ? 0 : n) : size_; }
  size_t bytes() const { return (k_.size() + v_.size()) * sizeof(float); }

  float* k(int64_t layer, int64_t pos) { return k_.data() + (layer * capacity_ + pos) * kv_dim_; }
  float* v(int64_t layer, int64_t pos) { return v_.data() + (layer * capacity_ + pos) * kv_dim_; }

 private:
  friend class Decoder;
  int64_t capacity_;
  int64_t kv_dim_;
  int64_t size_ = 0;
  std::vector<float> k_, v_;
};

class Decoder {
 public:
  Decoder(const Model& model, ThreadPool& pool);

  // Runs `n` tokens at positions cache.size() .. cache.size() + n - 1 and appends them to the
  // cache. Writes logits [n_logits, vocab] for the LAST n_logits of those positions
  // (0 <= n_logits <= n). Throws Error for token ids outside the vocabulary or a full cache.
  void forward(const int32_t* tokens, int64_t n, KVCache& cache, int64_t n_logits, float* logits);

  const Model& model() const { return model_; }

 private:
  void attention(int64_t layer, const float* q, int64_t n, int64_t pos0, KVCache& cache, float* out);

  const Model& model_;
  ThreadPool& pool_;
  std::vector<float> inv_freq_;
};

}  // namespace bioquant
