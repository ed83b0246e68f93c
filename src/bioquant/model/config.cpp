#include "bioquant/model/config.h"

#include <cmath>

#include "bioquant/core/error.h"

namespace bioquant {

int64_t ModelConfig::rotary_dim() const {
  int64_t d = static_cast<int64_t>(static_cast<double>(head_dim) * rope.partial_rotary_factor);
  return d - d % 2;
}

float ModelConfig::attention_scale() const {
  return query_scale > 0.0f ? query_scale : 1.0f / std::sqrt(static_cast<float>(head_dim));
}

int64_t ModelConfig::parameter_count() const {
  const int64_t attn = hidden * q_dim() + 2 * hidden * kv_dim() + q_dim() * hidden;
  const int64_t mlp = 3 * hidden * intermediate;
  const int64_t norms = (sandwich_norms ? 4 : 2) * hidden + (qk_norm ? 2 * head_dim : 0);
  const int64_t biases = (attn_qkv_bias ? q_dim() + 2 * kv_dim() : 0) + (attn_out_bias ? hidden : 0) +
                         (mlp_bias ? 2 * intermediate + hidden : 0);
  const int64_t per_layer = attn + mlp + norms + biases;
  return vocab * hidden * (tie_embeddings ? 1 : 2) + n_layers * per_layer + hidden;
}

const std::vector<std::string>& supported_model_types() {
  static const std::vector<std::string> kTypes{"llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3"};
  return kTypes;
}

void apply_family_traits(const std::string& model_type, ModelConfig& c) {
  c.model_type = model_type;
  if (model_type == "llama" || model_type == "mistral") {
    // Defaults only; llama's attention_bias / mlp_bias are read from config.json.
  } else if (model_type == "qwen2") {
    c.attn_qkv_bias = true;
  } else if (model_type == "qwen3") {
    c.qk_norm = true;
  } else if (model_type == "gemma2") {
    c.norm_unit_offset = true;
    c.sandwich_norms = true;
    c.embed_scale = true;
    c.activation = Activation::GeluTanh;
  } else if (model_type == "phi3") {
    c.fused_qkv = true;
    c.fused_gate_up = true;
  } else {
    std::string list;
    for (const auto& t : supported_model_types()) list += (list.empty() ? "" : ", ") + t;
    throw Error("unsupported model_type '" + model_type + "' (supported: " + list + ")");
  }
}

}  // namespace bioquant
