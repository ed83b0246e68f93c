// A loaded decoder: its config, its weights bound by role, and whatever keeps them alive.
#pragma once
#include <cstdint>
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
  // Bytes of every tensor the model holds (mapped or owned).
  size_t total_weight_bytes() const { return source_->mapped_bytes(); }
  // The storage dtype of the large matrices ("mixed" if they differ).
  std::string weight_dtype() const;

 private:
  ModelConfig config_;
  std::unique_ptr<TensorSource> source_;
  ModelWeights weights_;
};

// Reads config.json (+ generation_config.json) of a model directory.
ModelConfig load_model_config(const std::string& dir);

}  // namespace bioquant
