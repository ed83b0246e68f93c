#include "bioquant/io/gguf_export.h"

#include <cmath>
#include <cstring>
#include <memory>

#include "bioquant/core/error.h"
#include "bioquant/io/gguf.h"
#include "bioquant/kernels/cpu/ops.h"
#include "bioquant/model/model.h"
#include "bioquant/tokenizer/tokenizer.h"

namespace bioquant {

using nlohmann::json;

namespace {

GgufWriteValue u32(int64_t v) { return {GgufValueType::U32, GgufValueType::U8, static_cast<uint32_t>(v)}; }
GgufWriteValue f32(float v) { return {GgufValueType::F32, GgufValueType::U8, v}; }
GgufWriteValue str(const std::string& v) { return {GgufValueType::STRING, GgufValueType::U8, v}; }

struct Writer {
  std::vector<std::pair<std::string, GgufWriteValue>> metadata;
  std::vector<GgufWriteTensor> tensors;
  std::vector<std::unique_ptr<uint8_t[]>> owned;

  const uint8_t* keep(std::unique_ptr<uint8_t[]> p) {
    owned.push_back(std::move(p));
    return owned.back().get();
  }

  // Rows of several matrices of one format as one tensor (phi3's fused projections).
  void fused(const std::string& name, std::initializer_list<const Matrix*> parts) {
    const Matrix& first = **parts.begin();
    Matrix all = first;
    all.rows = 0;
    for (const Matrix* m : parts) {
      check(m->type == first.type && m->double_quant == first.double_quant && m->cols == first.cols,
            "quantize: " + name + " is fused in GGUF, so its parts need one format");
      all.rows += m->rows;
    }
    auto bytes = std::make_unique<uint8_t[]>(all.nbytes());
    size_t at = 0;
    for (const Matrix* m : parts) {
      std::memcpy(bytes.get() + at, m->data, m->nbytes());
      at += m->nbytes();
    }
    matrix(name, all, keep(std::move(bytes)));
  }

  void matrix(const std::string& name, const Matrix& m, const uint8_t* data = nullptr) {
    const int32_t ggml = quant_traits(m.type).ggml_type;
    GgufWriteTensor t;
    t.name = name;
    t.data = data ? data : m.data;
    t.nbytes = m.nbytes();
    if (ggml >= 0 && !m.double_quant) {
      t.dims = {static_cast<uint64_t>(m.cols), static_cast<uint64_t>(m.rows)};
      t.ggml_type = static_cast<uint32_t>(ggml);
    } else {
      t.dims = {static_cast<uint64_t>(m.row_bytes()), static_cast<uint64_t>(m.rows)};
      t.ggml_type = 24;  // I8: raw rows
      metadata.push_back({"bioquant.format." + name, str(std::string(quant_traits(m.type).name) + (m.double_quant ? "+dq" : ""))});
      metadata.push_back({"bioquant.cols." + name, u32(m.cols)});
    }
    tensors.push_back(t);
  }

  void vector(const std::string& name, const std::vector<float>& v) {
    auto bytes = std::make_unique<uint8_t[]>(v.size() * 4);
    std::memcpy(bytes.get(), v.data(), v.size() * 4);
    tensors.push_back({name, {static_cast<uint64_t>(v.size())}, 0, keep(std::move(bytes)), v.size() * 4});
  }
};

}  // namespace

void write_model_gguf(const Model& model, const std::string& path, const std::string& name, const Tokenizer* tok) {
  const ModelConfig& c = model.config();
  const ModelWeights& w = model.weights();
  const std::string arch = c.model_type == "mistral" ? "llama" : c.model_type;  // as llama.cpp files Mistral
  Writer out;
  auto key = [&](const std::string& k) { return arch + "." + k; };
  out.metadata.push_back({"general.architecture", str(arch)});
  out.metadata.push_back({"general.name", str(name)});
  out.metadata.push_back({key("context_length"), u32(c.max_positions)});
  out.metadata.push_back({key("embedding_length"), u32(c.hidden)});
  out.metadata.push_back({key("block_count"), u32(c.n_layers)});
  out.metadata.push_back({key("feed_forward_length"), u32(c.intermediate)});
  out.metadata.push_back({key("attention.head_count"), u32(c.n_heads)});
  out.metadata.push_back({key("attention.head_count_kv"), u32(c.n_kv_heads)});
  out.metadata.push_back({key("attention.key_length"), u32(c.head_dim)});
  out.metadata.push_back({key("attention.value_length"), u32(c.head_dim)});
  out.metadata.push_back({key("attention.layer_norm_rms_epsilon"), f32(c.norm_eps)});
  out.metadata.push_back({key("rope.freq_base"), f32(c.rope.theta)});
  out.metadata.push_back({key("rope.dimension_count"), u32(c.rotary_dim())});
  if (c.rope.type == RopeType::Linear) {
    out.metadata.push_back({key("rope.scaling.type"), str("linear")});
    out.metadata.push_back({key("rope.scaling.factor"), f32(c.rope.factor)});
  }
  if (c.rope.type == RopeType::Yarn) {  // llama.cpp multiplies attn_factor by its own 0.1 ln(factor) + 1
    out.metadata.push_back({key("rope.scaling.type"), str("yarn")});
    out.metadata.push_back({key("rope.scaling.factor"), f32(c.rope.factor)});
    out.metadata.push_back({key("rope.scaling.original_context_length"), u32(c.rope.original_max_positions)});
    out.metadata.push_back(
        {key("rope.scaling.attn_factor"), f32(static_cast<float>(c.rope.attention_factor / yarn_mscale(c.rope.factor)))});
    out.metadata.push_back({key("rope.scaling.yarn_beta_fast"), f32(c.rope.beta_fast)});
    out.metadata.push_back({key("rope.scaling.yarn_beta_slow"), f32(c.rope.beta_slow)});
    if (!c.rope.yarn_truncate) out.metadata.push_back({"bioquant.rope.yarn_no_truncate", u32(1)});
  }
  if (c.rope.type == RopeType::LongRope) {  // as llama.cpp's converter writes Phi-3 (the factors: tensors below)
    out.metadata.push_back({key("rope.scaling.attn_factor"), f32(c.rope.attention_factor)});
    out.metadata.push_back({key("rope.scaling.original_context_length"), u32(c.rope.original_max_positions)});
  }
  if (c.model_type == "gemma2") {
    out.metadata.push_back({key("attn_logit_softcapping"), f32(c.attn_softcap)});
    out.metadata.push_back({key("final_logit_softcapping"), f32(c.final_softcap)});
    out.metadata.push_back({key("attention.sliding_window"), u32(c.sliding_window)});
    // llama.cpp derives the query scale from the layer count; BioQuant records it exactly.
    out.metadata.push_back({"bioquant.query_scale", f32(c.attention_scale())});
  } else if (c.sliding_window > 0) {
    out.metadata.push_back({key("attention.sliding_window"), u32(c.sliding_window)});
  }
  bool has_bos = false, has_eos = false;
  if (tok != nullptr) {
    for (auto& kv : tok->gguf_metadata()) {
      has_bos |= kv.first == "tokenizer.ggml.bos_token_id";
      has_eos |= kv.first == "tokenizer.ggml.eos_token_id";
      out.metadata.push_back(std::move(kv));
    }
  }
  if (!has_bos && !c.bos_ids.empty()) out.metadata.push_back({"tokenizer.ggml.bos_token_id", u32(c.bos_ids[0])});
  if (!has_eos && !c.eos_ids.empty()) out.metadata.push_back({"tokenizer.ggml.eos_token_id", u32(c.eos_ids[0])});

  // llama.cpp stores llama3 / explicit frequency scaling as per-frequency divisors.
  std::vector<float> factors = c.rope.freq_factors;
  if (factors.empty() && c.rope.type == RopeType::Llama3) {
    RopeParams plain = c.rope;
    plain.type = RopeType::Default;
    std::vector<float> base(static_cast<size_t>(c.rotary_dim() / 2)), scaled(base.size());
    rope_inv_freq(plain, c.rotary_dim(), base.data());
    rope_inv_freq(c.rope, c.rotary_dim(), scaled.data());
    for (size_t i = 0; i < base.size(); ++i) factors.push_back(base[i] / scaled[i]);
  }
  if (!factors.empty()) out.vector("rope_freqs.weight", factors);
  if (c.rope.type == RopeType::LongRope) {
    out.vector("rope_factors_long.weight", c.rope.long_factor);
    out.vector("rope_factors_short.weight", c.rope.short_factor);
  }

  // Norms are held with Gemma's (1 + w) already folded in, which is what llama.cpp stores.
  out.matrix("token_embd.weight", w.embed);
  out.vector("output_norm.weight", w.final_norm);
  if (!(c.tie_embeddings && w.output.data == w.embed.data)) out.matrix("output.weight", w.output);
  for (int64_t i = 0; i < c.n_layers; ++i) {
    const LayerWeights& l = w.layers[static_cast<size_t>(i)];
    const std::string p = "blk." + std::to_string(i) + ".";
    // llama.cpp's converter permutes Q/K rows of llama files so RoPE rotates adjacent pairs.
    auto permuted = [&](const Matrix& m, int64_t heads) -> const uint8_t* {
      if (arch != "llama") return m.data;
      const size_t rb = m.row_bytes();
      const int64_t d = m.rows / heads, half = d / 2;
      auto copy = std::make_unique<uint8_t[]>(m.nbytes());
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t r = 0; r < half; ++r)
          for (int64_t s = 0; s < 2; ++s)
            std::memcpy(copy.get() + static_cast<size_t>(h * d + 2 * r + s) * rb, m.data + static_cast<size_t>(h * d + s * half + r) * rb, rb);
      return out.keep(std::move(copy));
    };
    if (c.fused_qkv) {
      out.fused(p + "attn_qkv.weight", {&l.wq, &l.wk, &l.wv});
    } else {
      out.matrix(p + "attn_q.weight", l.wq, permuted(l.wq, c.n_heads));
      out.matrix(p + "attn_k.weight", l.wk, permuted(l.wk, c.n_kv_heads));
      out.matrix(p + "attn_v.weight", l.wv);
    }
    out.matrix(p + "attn_output.weight", l.wo);
    if (!l.bq.empty()) {
      out.vector(p + "attn_q.bias", l.bq);
      out.vector(p + "attn_k.bias", l.bk);
      out.vector(p + "attn_v.bias", l.bv);
    }
    check(l.bo.empty() && l.b_gate.empty(), "quantize: output/MLP biases have no GGUF names here");
    if (c.fused_gate_up) {
      out.fused(p + "ffn_up.weight", {&l.w_gate, &l.w_up});
    } else {
      out.matrix(p + "ffn_gate.weight", l.w_gate);
      out.matrix(p + "ffn_up.weight", l.w_up);
    }
    out.matrix(p + "ffn_down.weight", l.w_down);
    out.vector(p + "attn_norm.weight", l.attn_norm);
    if (c.sandwich_norms) {
      out.vector(p + "post_attention_norm.weight", l.attn_post_norm);
      out.vector(p + "ffn_norm.weight", l.ffn_norm);
      out.vector(p + "post_ffw_norm.weight", l.ffn_post_norm);
    } else {
      out.vector(p + "ffn_norm.weight", l.ffn_norm);
    }
    if (c.qk_norm) {
      out.vector(p + "attn_q_norm.weight", l.q_norm);
      out.vector(p + "attn_k_norm.weight", l.k_norm);
    }
  }
  write_gguf(path, out.metadata, out.tensors);
}

}  // namespace bioquant
