#include "bioquant/model/model.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "bioquant/core/error.h"
#include "bioquant/core/half.h"
#include "bioquant/io/bnb_checkpoint.h"
#include "bioquant/io/gguf.h"
#include "bioquant/io/gguf_model.h"
#include "bioquant/io/hf_config.h"
#include "bioquant/io/llama2c.h"

namespace bioquant {
namespace {

// Checks presence, shape and dtype of the tensors a config calls for.
class Binder {
 public:
  Binder(const ModelConfig& config, const TensorSource& source, Model* owner)
      : config_(config), source_(source), owner_(owner) {}

  const TensorView& require(const std::string& name, const std::vector<int64_t>& shape) const {
    const TensorView* v = source_.find(name);
    check(v != nullptr, "missing tensor '" + name + "' (required by " + config_.model_type + " config)");
    check(v->shape == shape, "tensor '" + name + "' has shape " + shape_string(v->shape) + ", config expects " +
                                 shape_string(shape));
    return *v;
  }

  Matrix matrix(const std::string& name, int64_t rows, int64_t cols) const {
    if (auto bnb = convert_bnb_weight(source_, name, rows, cols)) {  // pre-quantized bitsandbytes layer
      const Matrix m{bnb->type, rows, cols, bnb->bytes.get(), bnb->double_quant};
      owner_->adopt(std::move(bnb->bytes));
      return m;
    }
    const TensorView& v = require(name, {rows, cols});
    if (!v.format.empty()) {  // quantized storage (GGUF files)
      if (const auto w = ggml_widening(v.format)) return widened(name, v, *w, rows, cols);
      const bool dq = v.format.size() > 3 && v.format.compare(v.format.size() - 3, 3, "+dq") == 0;
      const auto type = parse_quant_type(dq ? v.format.substr(0, v.format.size() - 3) : v.format);
      check(type.has_value(), "tensor '" + name + "' has unsupported format '" + v.format +
                                  "' (GGUF formats that load: f32, f16, bf16, q8_0, q4_0, q4_k, q5_k, q6_k, and q3_k, "
                                  "q5_0 held wider; quantize the original model with `bioquant quantize`)");
      Matrix m{*type, rows, cols, v.data, dq};
      check(v.nbytes == m.nbytes(), "tensor '" + name + "' holds " + std::to_string(v.nbytes) + " bytes, " + v.format +
                                        " rows of " + std::to_string(cols) + " need " + std::to_string(m.nbytes()));
      return m;
    }
    check(v.dtype == DType::F32 || v.dtype == DType::F16 || v.dtype == DType::BF16,
          "tensor '" + name + "' has dtype " + dtype_name(v.dtype) + "; expected F32, F16 or BF16");
    return Matrix::plain(v.dtype, rows, cols, aligned(v));
  }

  // A GGUF format held in a wider one (quant.h): the same weights in a format the kernels compute in.
  Matrix widened(const std::string& name, const TensorView& v, const GgmlWidening& w, int64_t rows, int64_t cols) const {
    check(cols % w.block_elems == 0, "tensor '" + name + "': " + v.format + " rows of " + std::to_string(cols) +
                                         " columns do not fill its blocks of " + std::to_string(w.block_elems));
    const size_t want = static_cast<size_t>(rows * (cols / w.block_elems) * w.block_bytes);
    check(v.nbytes == want, "tensor '" + name + "' holds " + std::to_string(v.nbytes) + " bytes, " + v.format +
                                " rows of " + std::to_string(cols) + " need " + std::to_string(want));
    auto bytes = std::make_unique<uint8_t[]>(static_cast<size_t>(rows) * quant_row_bytes(w.held, cols));
    widen_ggml_rows(v.format, v.data, rows, cols, bytes.get());
    const Matrix m{w.held, rows, cols, bytes.get()};
    owner_->adopt(std::move(bytes));
    owner_->count_widened(v.format);
    return m;
  }

  // safetensors does not promise aligned tensor data: misaligned elements are copied once, so every
  // kernel can load whole elements.
  const uint8_t* aligned(const TensorView& v) const {
    if (reinterpret_cast<uintptr_t>(v.data) % dtype_size(v.dtype) == 0) return v.data;
    auto copy = std::make_unique<uint8_t[]>(v.nbytes);
    std::memcpy(copy.get(), v.data, v.nbytes);
    const uint8_t* p = copy.get();
    owner_->adopt(std::move(copy));
    return p;
  }

  std::vector<float> vector(const std::string& name, int64_t size, float offset = 0.0f) const {
    const TensorView& v = require(name, {size});
    check(v.dtype == DType::F32 || v.dtype == DType::F16 || v.dtype == DType::BF16,
          "tensor '" + name + "' has dtype " + dtype_name(v.dtype) + "; expected F32, F16 or BF16");
    std::vector<float> out(static_cast<size_t>(size));
    Matrix::plain(v.dtype, 1, size, aligned(v)).row_to_f32(0, out.data());
    for (float& x : out) x += offset;
    return out;
  }

  std::vector<float> norm(const std::string& name, int64_t size) const {
    // Gemma stores w and scales by (1 + w); folding the 1 in here keeps the decoder uniform.
    return vector(name, size, config_.norm_unit_offset ? 1.0f : 0.0f);
  }

  bool has(const std::string& name) const { return source_.find(name) != nullptr; }

 private:
  const ModelConfig& config_;
  const TensorSource& source_;
  Model* owner_;  // keeps converted weights alive
};

LayerWeights bind_layer(const ModelConfig& c, const Binder& b, int64_t i) {
  const std::string p = "model.layers." + std::to_string(i) + ".";
  LayerWeights l;
  const int64_t h = c.hidden, q = c.q_dim(), kv = c.kv_dim(), ff = c.intermediate;
  if (c.fused_qkv) {
    const Matrix qkv = b.matrix(p + "self_attn.qkv_proj.weight", q + 2 * kv, h);
    l.wq = qkv.row_slice(0, q);
    l.wk = qkv.row_slice(q, kv);
    l.wv = qkv.row_slice(q + kv, kv);
  } else {
    l.wq = b.matrix(p + "self_attn.q_proj.weight", q, h);
    l.wk = b.matrix(p + "self_attn.k_proj.weight", kv, h);
    l.wv = b.matrix(p + "self_attn.v_proj.weight", kv, h);
  }
  l.wo = b.matrix(p + "self_attn.o_proj.weight", h, q);
  if (c.attn_qkv_bias) {
    l.bq = b.vector(p + "self_attn.q_proj.bias", q);
    l.bk = b.vector(p + "self_attn.k_proj.bias", kv);
    l.bv = b.vector(p + "self_attn.v_proj.bias", kv);
  }
  if (c.attn_out_bias) l.bo = b.vector(p + "self_attn.o_proj.bias", h);
  if (c.fused_gate_up) {
    const Matrix gate_up = b.matrix(p + "mlp.gate_up_proj.weight", 2 * ff, h);
    l.w_gate = gate_up.row_slice(0, ff);
    l.w_up = gate_up.row_slice(ff, ff);
  } else {
    l.w_gate = b.matrix(p + "mlp.gate_proj.weight", ff, h);
    l.w_up = b.matrix(p + "mlp.up_proj.weight", ff, h);
  }
  l.w_down = b.matrix(p + "mlp.down_proj.weight", h, ff);
  if (c.mlp_bias) {
    l.b_gate = b.vector(p + "mlp.gate_proj.bias", ff);
    l.b_up = b.vector(p + "mlp.up_proj.bias", ff);
    l.b_down = b.vector(p + "mlp.down_proj.bias", h);
  }
  l.attn_norm = b.norm(p + "input_layernorm.weight", h);
  if (c.sandwich_norms) {
    l.attn_post_norm = b.norm(p + "post_attention_layernorm.weight", h);
    l.ffn_norm = b.norm(p + "pre_feedforward_layernorm.weight", h);
    l.ffn_post_norm = b.norm(p + "post_feedforward_layernorm.weight", h);
  } else {
    l.ffn_norm = b.norm(p + "post_attention_layernorm.weight", h);
  }
  if (c.qk_norm) {
    l.q_norm = b.norm(p + "self_attn.q_norm.weight", c.head_dim);
    l.k_norm = b.norm(p + "self_attn.k_norm.weight", c.head_dim);
  }
  return l;
}

}  // namespace

ModelConfig load_model_config(const std::string& dir) {
  const std::string config_path = dir + "/config.json";
  std::error_code ec;
  check(std::filesystem::exists(dir, ec), dir + ": no such file or directory (no config.json to read)");
  check(!std::filesystem::is_regular_file(dir, ec),
        dir + ": neither a GGUF file (it does not start with GGUF's magic), a llama2.c checkpoint (its header does "
              "not match its size) nor a Hugging Face model directory");
  check(file_exists(config_path), dir + ": no config.json (not a Hugging Face model directory)");
  ModelConfig config = parse_hf_config(read_text_file(config_path), config_path);
  const std::string gen_path = dir + "/generation_config.json";
  if (file_exists(gen_path)) merge_generation_config(read_text_file(gen_path), gen_path, config);
  return config;
}

std::unique_ptr<Model> Model::load(const std::string& dir) {
  if (is_gguf_path(dir)) {
    auto gguf = std::make_shared<const GgufFile>(dir);
    ModelConfig config = config_from_gguf(*gguf);
    auto source = std::make_unique<GgufTensorSource>(gguf, config);
    return from_source(std::move(config), std::move(source));
  }
  if (is_llama2c_checkpoint(dir)) {
    auto [config, source] = load_llama2c(dir);
    return from_source(std::move(config), std::move(source));
  }
  ModelConfig config = load_model_config(dir);
  return from_source(std::move(config), std::make_unique<SafetensorsModelFiles>(dir));
}

std::unique_ptr<Model> Model::from_source(ModelConfig config, std::unique_ptr<TensorSource> source) {
  auto m = std::unique_ptr<Model>(new Model());
  m->config_ = std::move(config);
  m->source_ = std::move(source);
  const ModelConfig& c = m->config_;
  const Binder b(c, *m->source_, m.get());
  m->weights_.embed = b.matrix("model.embed_tokens.weight", c.vocab, c.hidden);
  if (c.tie_embeddings || !b.has("lm_head.weight")) {
    check(c.tie_embeddings, "missing tensor 'lm_head.weight' (config does not tie embeddings)");
    m->weights_.output = m->weights_.embed;
  } else {
    m->weights_.output = b.matrix("lm_head.weight", c.vocab, c.hidden);
  }
  m->weights_.final_norm = b.norm("model.norm.weight", c.hidden);
  for (int64_t i = 0; i < c.n_layers; ++i) m->weights_.layers.push_back(bind_layer(c, b, i));
  return m;
}

size_t Model::matrix_bytes() const {
  size_t total = weights_.output.nbytes();
  for (const LayerWeights& l : weights_.layers) {
    for (const Matrix* m : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) total += m->nbytes();
  }
  return total;
}

std::vector<std::pair<std::string, Matrix*>> Model::named_matrices() {
  std::vector<std::pair<std::string, Matrix*>> out;
  out.emplace_back("embedding", &weights_.embed);
  if (weights_.output.data != weights_.embed.data || weights_.output.type != weights_.embed.type)
    out.emplace_back("output", &weights_.output);
  static const char* const kNames[] = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"};
  for (size_t i = 0; i < weights_.layers.size(); ++i) {
    LayerWeights& l = weights_.layers[i];
    Matrix* ms[] = {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down};
    for (int k = 0; k < 7; ++k) out.emplace_back("layers." + std::to_string(i) + "." + kNames[k], ms[k]);
  }
  return out;
}

std::vector<std::pair<std::string, const Matrix*>> Model::named_matrices() const {
  std::vector<std::pair<std::string, const Matrix*>> out;
  for (auto& [name, m] : const_cast<Model*>(this)->named_matrices()) out.emplace_back(name, m);
  return out;
}

std::vector<std::string> Model::load_notes() const {
  std::vector<std::string> notes;
  for (const auto& [format, count] : widened_) {
    const GgmlWidening w = *ggml_widening(format);
    const QuantTraits& held = quant_traits(w.held);
    const double held_bits = 8.0 * static_cast<double>(held.block_bytes) / static_cast<double>(held.block_elems);
    char buf[320];
    std::snprintf(buf, sizeof buf,
                  "%lld %s matrices are held as %s: the same weights, bit for bit, at %.2f bits per weight instead of "
                  "%.2f (BioQuant has no %s kernels)",
                  static_cast<long long>(count), format.c_str(), held.name, held_bits, w.bits_per_weight, format.c_str());
    notes.push_back(buf);
  }
  return notes;
}

size_t Model::weight_bytes() const {
  size_t total = 0;
  for (const auto& [name, m] : named_matrices()) total += m->nbytes();
  auto vec = [](const std::vector<float>& v) { return v.size() * sizeof(float); };
  total += vec(weights_.final_norm);
  for (const LayerWeights& l : weights_.layers) {
    for (const auto* v : {&l.bq, &l.bk, &l.bv, &l.bo, &l.b_gate, &l.b_up, &l.b_down, &l.attn_norm, &l.attn_post_norm,
                          &l.ffn_norm, &l.ffn_post_norm, &l.q_norm, &l.k_norm})
      total += vec(*v);
  }
  return total;
}

void Model::release_source_bytes(const uint8_t* data, size_t nbytes) const { source_->release(data, nbytes); }

std::string Model::weight_dtype() const {
  const QuantType first = weights_.layers.empty() ? weights_.output.type : weights_.layers[0].wq.type;
  for (const LayerWeights& l : weights_.layers) {
    for (const Matrix* m : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) {
      if (m->type != first) return "mixed";
    }
  }
  return quant_traits(first).name;
}

}  // namespace bioquant
