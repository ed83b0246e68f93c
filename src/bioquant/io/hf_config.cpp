#include "bioquant/io/hf_config.h"

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>

#include "bioquant/core/error.h"
#include "bioquant/kernels/cpu/ops.h"

namespace bioquant {

using nlohmann::json;

namespace {

json parse_object(const std::string& text, const std::string& where) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception&) {
    throw Error(where + ": not valid JSON");
  }
  check(j.is_object(), where + ": expected a JSON object");
  return j;
}

int64_t get_int(const json& j, const char* key, const std::string& where, int64_t fallback = -1) {
  if (!j.contains(key) || j[key].is_null()) {
    check(fallback >= 0, where + ": missing '" + key + "'");
    return fallback;
  }
  check(j[key].is_number_integer() && j[key].get<int64_t>() >= 0,
        where + ": '" + key + "' must be a non-negative integer");
  return j[key].get<int64_t>();
}

float get_float(const json& j, const char* key, const std::string& where, float fallback) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  check(j[key].is_number(), where + ": '" + key + "' must be a number");
  return j[key].get<float>();
}

std::vector<float> get_positive_floats(const json& j, const char* key, const std::string& where) {
  check(j.contains(key) && j[key].is_array() && !j[key].empty(), where + ": longrope needs a list '" + key + "'");
  std::vector<float> out;
  for (const json& v : j[key]) {
    check(v.is_number() && v.get<double>() > 0.0, where + ": '" + key + "' must hold positive numbers");
    out.push_back(v.get<float>());
  }
  return out;
}

void read_ids(const json& value, const std::string& what, std::vector<int32_t>& out) {
  if (value.is_null()) return;
  if (value.is_number_integer()) {
    out.push_back(value.get<int32_t>());
    return;
  }
  check(value.is_array(), what + " must be an integer or a list of integers");
  for (const json& v : value) {
    check(v.is_number_integer(), what + " must be an integer or a list of integers");
    out.push_back(v.get<int32_t>());
  }
}

// RoPE: 5.x `rope_parameters` or 4.x `rope_theta` + `rope_scaling` (key `rope_type`, older `type`).
// max_positions: max_position_embeddings (longrope's scale is it over the original context).
void read_rope(const json& j, const std::string& where, int64_t max_positions, RopeParams& rope) {
  json params = json::object();
  if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) {
    params = j["rope_parameters"];
    // Per-attention-type parameters (newer Gemma spelling): all types must agree here.
    if (params.contains("full_attention") && params["full_attention"].is_object()) {
      for (auto it = params.begin(); it != params.end(); ++it) {
        check(it.value() == params["full_attention"],
              where + ": different RoPE parameters per attention type are not supported");
      }
      params = json(params["full_attention"]);
    }
  } else {
    if (j.contains("rope_scaling") && j["rope_scaling"].is_object()) params = j["rope_scaling"];
    if (j.contains("rope_theta")) params["rope_theta"] = j["rope_theta"];
  }
  rope.theta = get_float(params, "rope_theta", where, 10000.0f);
  std::string type = "default";
  if (params.contains("rope_type") && params["rope_type"].is_string()) {
    type = params["rope_type"].get<std::string>();
  } else if (params.contains("type") && params["type"].is_string()) {
    type = params["type"].get<std::string>();
  }
  if (type == "default") {
    rope.type = RopeType::Default;
  } else if (type == "linear") {
    rope.type = RopeType::Linear;
    rope.factor = get_float(params, "factor", where, 1.0f);
  } else if (type == "llama3") {
    rope.type = RopeType::Llama3;
    rope.factor = get_float(params, "factor", where, 8.0f);
    rope.low_freq_factor = get_float(params, "low_freq_factor", where, 1.0f);
    rope.high_freq_factor = get_float(params, "high_freq_factor", where, 4.0f);
    rope.original_max_positions = get_int(params, "original_max_position_embeddings", where, 8192);
    check(rope.high_freq_factor > rope.low_freq_factor, where + ": llama3 RoPE needs high_freq_factor > low_freq_factor");
  } else if (type == "longrope" || type == "su") {  // "su": its name in the first Phi-3 configs
    // As transformers computes it: each step's frequencies are theta^(-2i/d) / factor[i], with the long
    // factors once the step reaches past the original context; cos and sin are scaled by
    // attention_factor (given, or sqrt(1 + ln(scale) / ln(original)) for scale = max / original > 1).
    rope.type = RopeType::LongRope;
    rope.short_factor = get_positive_floats(params, "short_factor", where);
    rope.long_factor = get_positive_floats(params, "long_factor", where);
    rope.original_max_positions = get_int(params, "original_max_position_embeddings", where,
                                          get_int(j, "original_max_position_embeddings", where, max_positions));
    check(rope.original_max_positions > 1, where + ": longrope needs original_max_position_embeddings > 1");
    const double original = static_cast<double>(rope.original_max_positions);
    const double scale = get_float(params, "factor", where, static_cast<float>(static_cast<double>(max_positions) / original));
    rope.attention_factor =
        get_float(params, "attention_factor", where, static_cast<float>(longrope_attention_factor(scale, original)));
    check(rope.attention_factor > 0.0f, where + ": longrope attention_factor must be positive");
  } else if (type == "yarn") {
    // As transformers 5.17 computes it (rope_inv_freq has the ramp over the original context): the
    // factor as given, also where max_position_embeddings equals the original context (Qwen's model
    // cards add yarn so: measured, checks.probe_max_equals_original in the qwen2yarn fixture); the
    // attention factor (on cos and sin) 0.1 ln(factor) + 1, or mscale's ratio, unless given.
    rope.type = RopeType::Yarn;
    rope.factor = get_float(params, "factor", where, 0.0f);
    check(rope.factor > 0.0f, where + ": yarn needs a positive 'factor'");
    rope.original_max_positions = get_int(params, "original_max_position_embeddings", where, max_positions);
    check(rope.original_max_positions > 0, where + ": yarn needs original_max_position_embeddings > 0");
    const double mscale = get_float(params, "mscale", where, 0.0f), mscale_all = get_float(params, "mscale_all_dim", where, 0.0f);
    const double attention = mscale != 0.0 && mscale_all != 0.0 ? yarn_mscale(rope.factor, mscale) / yarn_mscale(rope.factor, mscale_all)
                                                                : yarn_mscale(rope.factor);
    rope.attention_factor = get_float(params, "attention_factor", where, static_cast<float>(attention));
    check(rope.attention_factor > 0.0f, where + ": yarn attention_factor must be positive");
    rope.beta_fast = get_float(params, "beta_fast", where, 32.0f);
    rope.beta_slow = get_float(params, "beta_slow", where, 1.0f);
    check(rope.beta_fast > 0.0f && rope.beta_slow > 0.0f, where + ": yarn beta_fast and beta_slow must be positive");
    if (params.contains("truncate")) {
      check(params["truncate"].is_boolean(), where + ": yarn 'truncate' must be true or false");
      rope.yarn_truncate = params["truncate"].get<bool>();
    }
  } else {
    throw Error(where + ": unsupported RoPE type '" + type + "' (supported: default, linear, llama3, longrope, yarn)");
  }
  // partial_rotary_factor sits at top level in 4.x and may sit in rope_parameters in 5.x.
  rope.partial_rotary_factor = get_float(params, "partial_rotary_factor", where, 1.0f);
  rope.partial_rotary_factor = get_float(j, "partial_rotary_factor", where, rope.partial_rotary_factor);
  check(rope.partial_rotary_factor > 0.0f && rope.partial_rotary_factor <= 1.0f,
        where + ": partial_rotary_factor must be in (0, 1]");
}

void read_layer_types(const json& j, const std::string& where, ModelConfig& c) {
  c.layer_sliding.assign(static_cast<size_t>(c.n_layers), false);
  if (j.contains("sliding_window") && j["sliding_window"].is_number_integer()) {
    c.sliding_window = j["sliding_window"].get<int64_t>();
  }
  if (c.model_type == "qwen2" && !j.value("use_sliding_window", false)) c.sliding_window = 0;
  if (j.contains("layer_types") && j["layer_types"].is_array()) {
    const json& types = j["layer_types"];
    check(static_cast<int64_t>(types.size()) == c.n_layers,
          where + ": layer_types has " + std::to_string(types.size()) + " entries for " +
              std::to_string(c.n_layers) + " layers");
    for (size_t i = 0; i < types.size(); ++i) {
      const std::string t = types[i].is_string() ? types[i].get<std::string>() : "";
      check(t == "full_attention" || t == "sliding_attention",
            where + ": unknown layer type " + types[i].dump());
      c.layer_sliding[i] = t == "sliding_attention" && c.sliding_window > 0;
    }
    return;
  }
  if (c.sliding_window <= 0) return;
  for (int64_t i = 0; i < c.n_layers; ++i) {
    bool sliding = true;
    if (c.model_type == "gemma2") sliding = i % 2 == 0;  // even layers slide, odd are global
    if (c.model_type == "qwen2") sliding = i >= j.value("max_window_layers", int64_t{0});
    c.layer_sliding[static_cast<size_t>(i)] = sliding;
  }
}

}  // namespace

ModelConfig parse_hf_config(const std::string& json_text, const std::string& where) {
  const json j = parse_object(json_text, where);
  check(j.contains("model_type") && j["model_type"].is_string(), where + ": missing 'model_type'");
  ModelConfig c;
  apply_family_traits(j["model_type"].get<std::string>(), c);

  c.hidden = get_int(j, "hidden_size", where);
  c.intermediate = get_int(j, "intermediate_size", where);
  c.n_layers = get_int(j, "num_hidden_layers", where);
  c.n_heads = get_int(j, "num_attention_heads", where);
  c.n_kv_heads = get_int(j, "num_key_value_heads", where, c.n_heads);
  c.vocab = get_int(j, "vocab_size", where);
  check(c.hidden > 0 && c.intermediate > 0 && c.n_layers > 0 && c.n_heads > 0 && c.n_kv_heads > 0 && c.vocab > 0,
        where + ": sizes must be positive");
  check(c.n_heads % c.n_kv_heads == 0, where + ": num_attention_heads must be a multiple of num_key_value_heads");
  const int64_t default_head_dim = c.hidden % c.n_heads == 0 ? c.hidden / c.n_heads : 0;
  c.head_dim = get_int(j, "head_dim", where, default_head_dim);
  check(c.head_dim > 0 && c.head_dim % 2 == 0, where + ": head_dim must be a positive even number");
  c.max_positions = get_int(j, "max_position_embeddings", where, 4096);
  c.norm_eps = get_float(j, "rms_norm_eps", where, 1e-6f);
  c.tie_embeddings = j.value("tie_word_embeddings", c.model_type == "gemma2");
  if (j.contains("torch_dtype") && j["torch_dtype"].is_string()) c.dtype = j["torch_dtype"].get<std::string>();
  if (j.contains("dtype") && j["dtype"].is_string()) c.dtype = j["dtype"].get<std::string>();

  read_rope(j, where, c.max_positions, c.rope);
  check(c.rotary_dim() > 0, where + ": rotary dimension is zero");
  if (c.rope.type == RopeType::LongRope) {
    const size_t pairs = static_cast<size_t>(c.rotary_dim() / 2);
    check(c.rope.short_factor.size() == pairs && c.rope.long_factor.size() == pairs,
          where + ": longrope short_factor and long_factor need " + std::to_string(pairs) +
              " values each (rotary dimension / 2), not " + std::to_string(c.rope.short_factor.size()) + " and " +
              std::to_string(c.rope.long_factor.size()));
  }

  if (c.model_type == "llama" || c.model_type == "mistral") {
    c.attn_qkv_bias = c.attn_out_bias = j.value("attention_bias", false);
    c.mlp_bias = j.value("mlp_bias", false);
  }
  if (c.model_type == "gemma2") {
    c.attn_softcap = get_float(j, "attn_logit_softcapping", where, 0.0f);
    c.final_softcap = get_float(j, "final_logit_softcapping", where, 0.0f);
    const float scalar = get_float(j, "query_pre_attn_scalar", where, static_cast<float>(c.head_dim));
    check(scalar > 0.0f, where + ": query_pre_attn_scalar must be positive");
    c.query_scale = 1.0f / std::sqrt(scalar);
    const std::string act = j.value("hidden_activation", std::string("gelu_pytorch_tanh"));
    check(act == "gelu_pytorch_tanh" || act == "gelu_tanh", where + ": unsupported hidden_activation '" + act + "'");
  } else {
    const std::string act = j.value("hidden_act", std::string("silu"));
    check(act == "silu" || act == "swish", where + ": unsupported hidden_act '" + act + "'");
  }
  read_layer_types(j, where, c);
  if (j.contains("bos_token_id")) read_ids(j["bos_token_id"], where + ": bos_token_id", c.bos_ids);
  if (j.contains("eos_token_id")) read_ids(j["eos_token_id"], where + ": eos_token_id", c.eos_ids);
  return c;
}

void merge_generation_config(const std::string& json_text, const std::string& where, ModelConfig& config) {
  const json j = parse_object(json_text, where);
  if (!j.contains("eos_token_id")) return;
  std::vector<int32_t> ids;
  read_ids(j["eos_token_id"], where + ": eos_token_id", ids);
  for (int32_t id : ids) {
    if (std::find(config.eos_ids.begin(), config.eos_ids.end(), id) == config.eos_ids.end()) config.eos_ids.push_back(id);
  }
}

}  // namespace bioquant
