// A loaded decoder: its config, its weights bound by role, and whatever keeps them alive.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "bioquant/io/tensor_source.h"
#include "bioquant/kernels/cpu/matmul.h"
#include "bioquant/model/config.h"

namespace bioquant {

struct LayerWeights {
  Matrix wq, wk, wv, wo;
  Matrix w_gate, w_up, w_down;
  std::vector<float> bq, bk, bv, bo, b_gate, b_up, b_down;  // empty when the family has none
  std::vector<float> attn_norm, attn_post_norm, ffn_norm, ffn_post_norm;  // post norms: sandwich only
  std::vector<float> q_norm, k_norm;                                     // qk_norm only
};

struct ModelWeights {
  Matrix embed;   // [vocab, hidden]
  Matrix output;  // [vocab, hidden]; the embedding itself when tied
  std::vector<float> final_norm;
  std::vector<LayerWeights> layers;
};

class Model {
 public:
  // Loads a Hugging Face model directory (config.json + safetensors). Throws Error.
  static std::unique_ptr<Model> load(const std::string& dir);
  // Binds weights from any source against a config (used by load, synthetic models and tests).
  static std::unique_ptr<Model> from_source(ModelConfig config, std::unique_ptr<TensorSource> source);

  const ModelConfig& config() const { return config_; }
  const ModelWeights& weights() const { return weights_; }
  // Bytes of the large matrices read per decoded token (all layers + output projection).
  size_t matrix_bytes() const;
  // Bytes of all weights as held for inference (matrices in their formats + f32 norms/biases).
  size_t weight_bytes() const;
  // The storage format of the layers' matrices ("mixed" if they differ).
  std::string weight_dtype() const;

  // Every weight matrix with a stable name ("embedding", "output", "layers.N.attn_q", ...). A tied
  // output is listed once, as "embedding", unless it has been given storage of its own.
  std::vector<std::pair<std::string, Matrix*>> named_matrices();
  std::vector<std::pair<std::string, const Matrix*>> named_matrices() const;
  // After the embedding changed storage: a tied output follows it.
  void retie_output() {
    if (config_.tie_embeddings) weights_.output = weights_.embed;
  }
  // Takes ownership of storage that a Matrix of this model now points into.
  void adopt(std::unique_ptr<uint8_t[]> storage) { owned_.push_back(std::move(storage)); }
  // Matrices read in a GGUF format held in a wider one (quant.h: ggml_widening), by format.
  void count_widened(const std::string& format) { ++widened_[format]; }
  // What loading did that a user should know about: one line per widened format ("" when none).
  std::vector<std::string> load_notes() const;
  // Lets the OS drop pages of a mapped source tensor that is no longer used (no-op for owned data).
  void release_source_bytes(const uint8_t* data, size_t nbytes) const;

 private:
  ModelConfig config_;
  std::unique_ptr<TensorSource> source_;
  ModelWeights weights_;
  std::vector<std::unique_ptr<uint8_t[]>> owned_;  // quantized copies
  std::map<std::string, int64_t> widened_;
};

// Reads config.json (+ generation_config.json) of a model directory.
ModelConfig load_model_config(const std::string& dir);

}  // namespace bioquant
