// Hyperparameters of a decoder-only transformer plus the per-family traits that the one
// generic decoder (decoder.h) switches on. A family is a row of flags, not a code path.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace bioquant {

enum class Activation { Silu, GeluTanh };
enum class RopeType { Default, Linear, Llama3, LongRope, Yarn };

struct RopeParams {
  float theta = 10000.0f;
  RopeType type = RopeType::Default;
  float factor = 1.0f;                   // linear, llama3, yarn
  float low_freq_factor = 1.0f;          // llama3
  float high_freq_factor = 4.0f;         // llama3
  int64_t original_max_positions = 8192; // llama3, yarn; longrope: steps whose last position is past it take long_factor
  float partial_rotary_factor = 1.0f;    // fraction of head_dim that is rotated (phi3/phi4-mini)
  std::vector<float> freq_factors;       // GGUF rope_freqs: inv_freq[i] /= freq_factors[i] (instead of `type`)
  // longrope (Phi-3.5, Phi-3 128K, Phi-4-mini): per-frequency divisors, and the factor cos and sin are
  // scaled by at every position (HF's attention_scaling).
  std::vector<float> short_factor, long_factor;
  float attention_factor = 1.0f;  // longrope, yarn
  // yarn (Qwen2.5, Qwen3 long-context configs): the rotations bounding the ramp from extrapolated to
  // interpolated frequencies, and whether its ends are rounded to whole dimensions.
  float beta_fast = 32.0f, beta_slow = 1.0f;
  bool yarn_truncate = true;
};

struct ModelConfig {
  std::string model_type;  // "llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3"
  int64_t hidden = 0;
  int64_t intermediate = 0;
  int64_t n_layers = 0;
  int64_t n_heads = 0;
  int64_t n_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t vocab = 0;
  int64_t max_positions = 0;
  float norm_eps = 1e-6f;
  bool tie_embeddings = false;
  RopeParams rope;
  std::vector<int32_t> bos_ids;
  std::vector<int32_t> eos_ids;
  std::string dtype;  // torch_dtype / dtype as declared

  // Family traits.
  bool attn_qkv_bias = false;     // qwen2; llama's `attention_bias`
  bool attn_out_bias = false;     // llama's `attention_bias`
  bool mlp_bias = false;          // llama's `mlp_bias`
  bool qk_norm = false;           // qwen3: per-head RMSNorm on q and k before RoPE
  bool norm_unit_offset = false;  // gemma2: RMSNorm scales by (1 + w)
  bool sandwich_norms = false;    // gemma2: extra norms after attention and after the MLP
  bool embed_scale = false;       // gemma2: embeddings times sqrt(hidden)
  bool fused_qkv = false;         // phi3: one qkv_proj
  bool fused_gate_up = false;     // phi3: one gate_up_proj
  Activation activation = Activation::Silu;
  float attn_softcap = 0.0f;      // gemma2: tanh(s / c) * c on attention scores (0 = off)
  float final_softcap = 0.0f;     // gemma2: the same on the output logits
  float query_scale = 0.0f;       // score multiplier; 0 means head_dim^-0.5
  int64_t sliding_window = 0;     // window of keys a sliding layer sees, itself included (0 = none)
  std::vector<bool> layer_sliding;  // per layer: does it use the sliding window?

  int64_t q_dim() const { return n_heads * head_dim; }
  int64_t kv_dim() const { return n_kv_heads * head_dim; }
  int64_t rotary_dim() const;
  float attention_scale() const;
  int64_t parameter_count() const;
};

// The families the decoder covers, as written in config.json's model_type.
const std::vector<std::string>& supported_model_types();

// Sets the family traits of `model_type`; throws Error naming the supported ones if unknown.
void apply_family_traits(const std::string& model_type, ModelConfig& config);

}  // namespace bioquant
