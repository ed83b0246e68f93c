#include "bioquant/io/gguf_model.h"

#include <cctype>
#include <cmath>
#include <cstring>

#include "bioquant/core/error.h"
#include "bioquant/core/half.h"
#include "bioquant/kernels/cpu/ops.h"

namespace bioquant {

using nlohmann::json;

namespace {

constexpr uint32_t kGgmlF32 = 0, kGgmlF16 = 1, kGgmlBF16 = 30;

int64_t get_int_or(const GgufFile& g, const std::string& key, int64_t fallback) {
  return g.has(key) && g.metadata()[key].is_number_integer() ? g.metadata()[key].get<int64_t>() : fallback;
}
float get_float_or(const GgufFile& g, const std::string& key, float fallback) {
  return g.has(key) && g.metadata()[key].is_number() ? g.metadata()[key].get<float>() : fallback;
}

// GGUF name prefix -> HF name suffix, per layer.
struct NameMap {
  const char* gguf;
  const char* hf;
};
const NameMap kLayerNames[] = {
    {"attn_norm.weight", "input_layernorm.weight"},
    {"attn_q.weight", "self_attn.q_proj.weight"},
    {"attn_k.weight", "self_attn.k_proj.weight"},
    {"attn_v.weight", "self_attn.v_proj.weight"},
    {"attn_q.bias", "self_attn.q_proj.bias"},
    {"attn_k.bias", "self_attn.k_proj.bias"},
    {"attn_v.bias", "self_attn.v_proj.bias"},
    {"attn_qkv.weight", "self_attn.qkv_proj.weight"},
    {"attn_output.weight", "self_attn.o_proj.weight"},
    {"attn_q_norm.weight", "self_attn.q_norm.weight"},
    {"attn_k_norm.weight", "self_attn.k_norm.weight"},
    {"ffn_gate.weight", "mlp.gate_proj.weight"},
    {"ffn_down.weight", "mlp.down_proj.weight"},
};

}  // namespace

ModelConfig config_from_gguf(const GgufFile& g) {
  const std::string where = g.path();
  const std::string arch = g.get_string("general.architecture");
  ModelConfig c;
  // llama.cpp files Mistral under "llama"; the other families keep their own names.
  apply_family_traits(arch, c);
  auto key = [&](const std::string& k) { return arch + "." + k; };
  c.hidden = g.get_int(key("embedding_length"));
  c.intermediate = g.get_int(key("feed_forward_length"));
  c.n_layers = g.get_int(key("block_count"));
  c.n_heads = g.get_int(key("attention.head_count"));
  c.n_kv_heads = get_int_or(g, key("attention.head_count_kv"), c.n_heads);
  check(c.hidden > 0 && c.n_layers > 0 && c.n_heads > 0 && c.n_kv_heads > 0 && c.n_heads % c.n_kv_heads == 0,
        where + ": inconsistent attention sizes");
  c.head_dim = get_int_or(g, key("attention.key_length"), c.hidden / c.n_heads);
  c.max_positions = get_int_or(g, key("context_length"), 4096);
  c.norm_eps = get_float_or(g, key("attention.layer_norm_rms_epsilon"), 1e-5f);
  c.rope.theta = get_float_or(g, key("rope.freq_base"), 10000.0f);
  const int64_t rot = get_int_or(g, key("rope.dimension_count"), c.head_dim);
  c.rope.partial_rotary_factor = static_cast<float>(rot) / static_cast<float>(c.head_dim);
  const GgufTensorInfo* long_factors = g.find_tensor("rope_factors_long.weight");
  const GgufTensorInfo* short_factors = g.find_tensor("rope_factors_short.weight");
  if (g.has(key("rope.scaling.type"))) {
    const std::string type = g.get_string(key("rope.scaling.type"));
    if (type == "linear") {
      c.rope.type = RopeType::Linear;
      c.rope.factor = get_float_or(g, key("rope.scaling.factor"), 1.0f);
    } else if (type == "yarn") {
      // llama.cpp scales cos and sin by attn_factor * (0.1 ln(factor) + 1), as transformers' default does.
      c.rope.type = RopeType::Yarn;
      c.rope.factor = get_float_or(g, key("rope.scaling.factor"), 0.0f);
      check(c.rope.factor > 0.0f, where + ": yarn scaling needs a positive rope.scaling.factor");
      c.rope.original_max_positions = get_int_or(g, key("rope.scaling.original_context_length"), c.max_positions);
      check(c.rope.original_max_positions > 0, where + ": rope.scaling.original_context_length must be positive");
      c.rope.attention_factor =
          static_cast<float>(get_float_or(g, key("rope.scaling.attn_factor"), 1.0f) * yarn_mscale(c.rope.factor));
      c.rope.beta_fast = get_float_or(g, key("rope.scaling.yarn_beta_fast"), 32.0f);
      c.rope.beta_slow = get_float_or(g, key("rope.scaling.yarn_beta_slow"), 1.0f);
      c.rope.yarn_truncate = !g.has("bioquant.rope.yarn_no_truncate");
      check(c.rope.attention_factor > 0.0f && c.rope.beta_fast > 0.0f && c.rope.beta_slow > 0.0f,
            where + ": yarn attention factor and betas must be positive");
    } else if (type == "longrope") {
      check(long_factors != nullptr && short_factors != nullptr,
            where + ": longrope scaling without rope_factors_long.weight and rope_factors_short.weight");
    } else {
      check(type == "none", where + ": unsupported rope scaling '" + type + "'");
    }
  }
  if (long_factors != nullptr || short_factors != nullptr) {
    // llama.cpp's Phi-3 files: the two factor lists as tensors, the attention factor as attn_factor.
    check(long_factors != nullptr && short_factors != nullptr,
          where + ": rope_factors_long.weight and rope_factors_short.weight come together");
    const size_t pairs = static_cast<size_t>(rot / 2);
    auto factors = [&](const GgufTensorInfo* f) {
      check(f->ggml_type == kGgmlF32 && f->dims.size() == 1 && f->dims[0] == pairs,
            where + ": " + f->name + " must be F32 with " + std::to_string(pairs) + " values (rotary dimension / 2)");
      const float* v = reinterpret_cast<const float*>(f->data);
      for (size_t i = 0; i < pairs; ++i) check(v[i] > 0.0f, where + ": " + f->name + " must hold positive values");
      return std::vector<float>(v, v + pairs);
    };
    c.rope.type = RopeType::LongRope;
    c.rope.long_factor = factors(long_factors);
    c.rope.short_factor = factors(short_factors);
    c.rope.original_max_positions = get_int_or(g, key("rope.scaling.original_context_length"), c.max_positions);
    check(c.rope.original_max_positions > 1, where + ": rope.scaling.original_context_length must be above 1");
    const double scale = static_cast<double>(c.max_positions) / static_cast<double>(c.rope.original_max_positions);
    const double attention = longrope_attention_factor(scale, static_cast<double>(c.rope.original_max_positions));
    c.rope.attention_factor = get_float_or(g, key("rope.scaling.attn_factor"), static_cast<float>(attention));
    check(c.rope.attention_factor > 0.0f, where + ": rope.scaling.attn_factor must be positive");
  }
  const GgufTensorInfo* embd = g.find_tensor("token_embd.weight");
  check(embd != nullptr && embd->dims.size() == 2, where + ": no token_embd.weight");
  c.vocab = static_cast<int64_t>(embd->dims[1]);
  c.tie_embeddings = g.find_tensor("output.weight") == nullptr;
  c.layer_sliding.assign(static_cast<size_t>(c.n_layers), false);
  if (arch == "gemma2") {
    c.attn_softcap = get_float_or(g, key("attn_logit_softcapping"), 50.0f);
    c.final_softcap = get_float_or(g, key("final_logit_softcapping"), 30.0f);
    c.sliding_window = get_int_or(g, key("attention.sliding_window"), 4096);
    for (int64_t i = 0; i < c.n_layers; ++i) c.layer_sliding[static_cast<size_t>(i)] = i % 2 == 0;
    // llama.cpp: Gemma 2 27B (46 blocks) scales queries by (hidden/heads)^-0.5, the others by head_dim^-0.5.
    c.query_scale = 1.0f / std::sqrt(static_cast<float>(c.n_layers == 46 ? c.hidden / c.n_heads : c.head_dim));
    if (g.has("bioquant.query_scale")) c.query_scale = get_float_or(g, "bioquant.query_scale", c.query_scale);
    // The converter stored the norms as (1 + w) already: they are plain scales here.
    c.norm_unit_offset = false;
  }
  if (g.has(key("attention.sliding_window")) && arch != "gemma2") {
    c.sliding_window = g.get_int(key("attention.sliding_window"));
    c.layer_sliding.assign(static_cast<size_t>(c.n_layers), c.sliding_window > 0);
  }
  if (const GgufTensorInfo* f = g.find_tensor("rope_freqs.weight")) {
    check(f->ggml_type == kGgmlF32, where + ": rope_freqs.weight must be F32");
    c.rope.freq_factors.assign(reinterpret_cast<const float*>(f->data), reinterpret_cast<const float*>(f->data) + f->dims[0]);
  }
  if (g.has("tokenizer.ggml.bos_token_id")) c.bos_ids = {static_cast<int32_t>(g.get_int("tokenizer.ggml.bos_token_id"))};
  if (g.has("tokenizer.ggml.eos_token_id")) c.eos_ids = {static_cast<int32_t>(g.get_int("tokenizer.ggml.eos_token_id"))};
  if (g.has("tokenizer.ggml.eot_token_id")) c.eos_ids.push_back(static_cast<int32_t>(g.get_int("tokenizer.ggml.eot_token_id")));
  c.dtype = "gguf";
  return c;
}

GgufTensorSource::GgufTensorSource(std::shared_ptr<const GgufFile> gguf, const ModelConfig& c) : gguf_(std::move(gguf)) {
  const std::string arch = gguf_->get_string("general.architecture");
  auto add = [&](const GgufTensorInfo& t, const std::string& hf_name) {
    TensorView v;
    v.name = hf_name;
    for (auto it = t.dims.rbegin(); it != t.dims.rend(); ++it) v.shape.push_back(static_cast<int64_t>(*it));  // HF order
    v.data = t.data;
    v.nbytes = t.nbytes;
    if (t.ggml_type == kGgmlF32) {
      v.dtype = DType::F32;
    } else if (t.ggml_type == kGgmlF16) {
      v.dtype = DType::F16;
    } else if (t.ggml_type == kGgmlBF16) {
      v.dtype = DType::BF16;
    } else {
      v.dtype = DType::U8;
      v.ggml_type = static_cast<int32_t>(t.ggml_type);
      v.format = ggml_type_name(t.ggml_type);
      for (char& ch : v.format) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    }
    // BioQuant's own formats (int8, nf4, fp4) travel as I8 byte rows with their name in metadata.
    const std::string fmt_key = "bioquant.format." + t.name;
    if (gguf_->has(fmt_key)) {
      check(t.ggml_type == 24 && t.dims.size() == 2, gguf_->path() + ": " + t.name + " must be an I8 byte matrix");
      v.format = gguf_->get_string(fmt_key);
      const std::string cols_key = "bioquant.cols." + t.name;
      v.shape = {static_cast<int64_t>(t.dims[1]), gguf_->get_int(cols_key)};
      v.dtype = DType::U8;
    }
    views_[hf_name] = v;
  };
  for (const GgufTensorInfo& t : gguf_->tensors()) {
    const std::string& n = t.name;
    if (n == "token_embd.weight") {
      add(t, "model.embed_tokens.weight");
    } else if (n == "output_norm.weight") {
      add(t, "model.norm.weight");
    } else if (n == "output.weight") {
      add(t, "lm_head.weight");
    } else if (n.rfind("blk.", 0) == 0) {
      const size_t dot = n.find('.', 4);
      if (dot == std::string::npos) continue;
      const std::string layer = n.substr(4, dot - 4), rest = n.substr(dot + 1);
      const std::string p = "model.layers." + layer + ".";
      std::string hf;
      for (const NameMap& m : kLayerNames)
        if (rest == m.gguf) hf = m.hf;
      if (rest == "ffn_up.weight") hf = c.fused_gate_up ? "mlp.gate_up_proj.weight" : "mlp.up_proj.weight";
      if (rest == "ffn_norm.weight") hf = c.sandwich_norms ? "pre_feedforward_layernorm.weight" : "post_attention_layernorm.weight";
      if (rest == "post_attention_norm.weight") hf = "post_attention_layernorm.weight";
      if (rest == "post_ffw_norm.weight") hf = "post_feedforward_layernorm.weight";
      if (!hf.empty()) add(t, p + hf);
    }
  }
  // Undo llama.cpp's Q/K row permutation for llama-architecture files (see header).
  if (arch == "llama") {
    for (int64_t i = 0; i < c.n_layers; ++i) {
      for (const auto& [suffix, heads] : {std::pair<const char*, int64_t>{"self_attn.q_proj.weight", c.n_heads},
                                          std::pair<const char*, int64_t>{"self_attn.k_proj.weight", c.n_kv_heads}}) {
        auto it = views_.find("model.layers." + std::to_string(i) + "." + suffix);
        if (it == views_.end() || it->second.shape.size() != 2) continue;
        TensorView& v = it->second;
        const int64_t rows = v.shape[0];
        check(rows % (heads * 2) == 0, gguf_->path() + ": " + v.name + " rows do not split into heads");
        const size_t row_bytes = v.nbytes / static_cast<size_t>(rows);
        const int64_t d = rows / heads, half = d / 2;
        auto copy = std::make_unique<uint8_t[]>(v.nbytes);
        for (int64_t h = 0; h < heads; ++h)
          for (int64_t r = 0; r < half; ++r)
            for (int64_t s = 0; s < 2; ++s)  // HF row h*d + s*half + r  <-  GGUF row h*d + 2r + s
              std::memcpy(copy.get() + static_cast<size_t>(h * d + s * half + r) * row_bytes,
                          v.data + static_cast<size_t>(h * d + 2 * r + s) * row_bytes, row_bytes);
        v.data = copy.get();
        owned_.push_back(std::move(copy));
      }
    }
  }
}

const TensorView* GgufTensorSource::find(const std::string& name) const {
  auto it = views_.find(name);
  return it == views_.end() ? nullptr : &it->second;
}

void GgufTensorSource::release(const uint8_t* data, size_t nbytes) const {
  for (const auto& owned : owned_)
    if (data == owned.get()) return;  // a permuted copy, not the mapping
  release_mapped_range(data, nbytes);
}

size_t GgufTensorSource::mapped_bytes() const {
  size_t total = 0;
  for (const auto& [name, v] : views_) total += v.nbytes;
  return total;
}

}  // namespace bioquant
