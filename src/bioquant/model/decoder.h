// The one generic decoder forward pass, parameterised by ModelConfig's family traits,
// and its KV cache.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "bioquant/core/thread_pool.h"
#include "bioquant/kernels/cuda/gpu_decoder.h"
#include "bioquant/model/model.h"

namespace bioquant {

// K and V of every processed position, f32, laid out [layer][position][kv_head][head_dim]. The
// host storage is allocated when a CPU decoder first uses the cache; a GPU decoder keeps the K/V
// of the cache on its device instead.
class KVCache {
 public:
  KVCache(const ModelConfig& config, int64_t capacity);
  ~KVCache() {
    if (on_release) on_release(*this);
  }
  KVCache(const KVCache&) = delete;
  KVCache& operator=(const KVCache&) = delete;

  int64_t capacity() const { return capacity_; }
  int64_t size() const { return size_; }  // positions filled so far
  void clear() { size_ = 0; }
  // Forgets every position from n on (prefix reuse: keep a shared prompt, drop what followed it).
  void truncate(int64_t n) { size_ = n < size_ ? (n < 0 ? 0 : n) : size_; }
  size_t bytes() const { return (k_.size() + v_.size()) * sizeof(float); }  // host bytes held
  // Set by a GPU decoder that holds device memory for this cache.
  std::function<void(const KVCache&)> on_release;

  float* k(int64_t layer, int64_t pos) { return k_.data() + (layer * capacity_ + pos) * kv_dim_; }
  float* v(int64_t layer, int64_t pos) { return v_.data() + (layer * capacity_ + pos) * kv_dim_; }

 private:
  friend class Decoder;
  void ensure_host();
  int64_t capacity_;
  int64_t kv_dim_;
  int64_t n_layers_;
  int64_t size_ = 0;
  std::vector<float> k_, v_;
};

// One sequence's share of a batched forward pass: `n` tokens appended to `cache`, logits
// [n_logits, vocab] of its last n_logits positions written to `logits` (as Decoder::forward).
// top (optional): the greedy next token, top_token of the last logits row, written there; logits
// may then be null (a GPU then computes it there and copies 4 bytes instead of the rows).
struct DecodeSegment {
  const int32_t* tokens = nullptr;
  int64_t n = 0;
  KVCache* cache = nullptr;
  int64_t n_logits = 0;
  float* logits = nullptr;
  int32_t* top = nullptr;
  // longrope: rotate with the long factors even where this segment's own last position stays within the
  // original context (Decoder sets it on the rounds of a prompt it splits, so they rotate as the whole).
  bool long_rope = false;
};

// The id of the largest of n logits, the lowest among equal ones (std::max_element's, for logits
// without NaN).
int32_t top_token(const float* logits, int64_t n);

class Decoder {
 public:
  // device: -1 = CPU; N = CUDA device N (see parse_device in kernels/cuda/gpu_decoder.h), whose
  // KV caches are kept in `kv` (bf16 by default; the CPU's are f32).
  // exact: exact numerics (kernels/exact.h): the CPU and the GPU compute the same logits bit for bit
  // (so the same greedy continuation), slower than the default kernels; on a GPU it needs kv = F32.
  Decoder(const Model& model, ThreadPool& pool, int device = -1, KvType kv = KvType::BF16, bool exact = false);
  ~Decoder();

  // Runs `n` tokens at positions cache.size() .. cache.size() + n - 1 and appends them to the
  // cache. Writes logits [n_logits, vocab] for the LAST n_logits of those positions
  // (0 <= n_logits <= n). Throws Error for token ids outside the vocabulary or a full cache.
  void forward(const int32_t* tokens, int64_t n, KVCache& cache, int64_t n_logits, float* logits);

  // Several sequences in one pass (continuous batching: prompt chunks of new sequences and one
  // decode token of each running one). The rows of all segments are stacked, so every weight
  // matrix is read once for the whole batch; RoPE, the KV cache and attention stay per sequence.
  // Each segment's logits are bit-identical to a forward() of that segment alone. Every segment
  // needs n > 0 and a cache of its own. Validates everything before touching any cache.
  void forward_batch(std::span<const DecodeSegment> segments);

  // Makes `to` hold the first n positions of `from` (both this decoder's caches): a prompt prefix
  // computed once and shared by several sequences. Throws Error when n exceeds what `from` holds or
  // what `to` can, or when the two are the same cache.
  void copy_prefix(const KVCache& from, KVCache& to, int64_t n);

  const Model& model() const { return model_; }
  bool exact() const { return exact_; }
  // The GPU backend, or null on the CPU.
  GpuDecoder* gpu() const { return gpu_.get(); }

 private:
  struct Row {  // one stacked row: where its K/V go, which position it is, which RoPE factors it takes
    KVCache* cache;
    int64_t pos;
    bool long_rope;
  };
  void attention(int64_t layer, const float* q, const std::vector<Row>& rows, float* out);

  const Model& model_;
  ThreadPool& pool_;
  std::vector<float> inv_freq_;  // rotary_dim / 2 frequencies, then longrope's long ones (a copy otherwise)
  bool exact_ = false;
  std::unique_ptr<GpuDecoder> gpu_;
};

}  // namespace bioquant
