#include "bioquant/model/synthetic.h"

#include <cmath>

#include "bioquant/core/error.h"
#include "bioquant/core/half.h"
#include "bioquant/io/hf_config.h"
#include "bioquant/model/quantize.h"
#include "bioquant/quant/random_rows.h"

namespace bioquant {
namespace {

struct Shape {
  const char* name;
  const char* family;
  int64_t hidden, layers, heads, kv_heads, ffn, vocab;
  float rope_theta;
  bool llama3_rope;
  bool tied;
};

const Shape kShapes[] = {
    {"tiny", "llama", 128, 2, 4, 2, 256, 512, 10000.0f, false, false},
    {"llama-1b", "llama", 2048, 16, 32, 8, 5632, 32000, 10000.0f, false, false},
    {"llama3-8b", "llama", 4096, 32, 32, 8, 14336, 128256, 500000.0f, true, false},
    {"llama3-70b", "llama", 8192, 80, 64, 8, 28672, 128256, 500000.0f, true, false},
    {"qwen2.5-7b", "qwen2", 3584, 28, 28, 4, 18944, 152064, 1000000.0f, false, false},
};

// The study's other families, as the fields of their config.json that shape the model, read by the parser
// a checkpoint's goes through (so each family's traits come out as a real one's: Gemma 2's softcaps, sliding
// layers and sandwich norms, Phi-3's fused matrices, Qwen3's q/k norms).
struct ConfigShape {
  const char* name;
  const char* config_json;
};
const ConfigShape kConfigShapes[] = {
    {"mistral-7b",
     R"({"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
         "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32768, "max_position_embeddings": 32768,
         "rope_theta": 1000000.0, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2})"},
    {"qwen3-8b",
     R"({"model_type": "qwen3", "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
         "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
         "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": false,
         "bos_token_id": 151643, "eos_token_id": 151645})"},
    {"gemma2-9b",
     R"({"model_type": "gemma2", "hidden_size": 3584, "intermediate_size": 14336, "num_hidden_layers": 42,
         "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "vocab_size": 256000,
         "max_position_embeddings": 8192, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "sliding_window": 4096,
         "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
         "tie_word_embeddings": true, "bos_token_id": 2, "eos_token_id": 1})"},
    {"phi3-mini",
     R"({"model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
         "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064, "max_position_embeddings": 4096,
         "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "sliding_window": 2047, "bos_token_id": 1, "eos_token_id": 32000})"},
    {"phi4-14b",
     R"({"model_type": "phi3", "hidden_size": 5120, "intermediate_size": 17920, "num_hidden_layers": 40,
         "num_attention_heads": 40, "num_key_value_heads": 10, "vocab_size": 100352, "max_position_embeddings": 16384,
         "rope_theta": 250000.0, "rms_norm_eps": 1e-5, "bos_token_id": 100257, "eos_token_id": 100265})"},
};

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

void fill_random(uint8_t* data, DType dtype, int64_t n, float amplitude, uint64_t seed, ThreadPool& pool) {
  constexpr int64_t kChunk = 1 << 20;
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
  pool.parallel_for(static_cast<size_t>(n_chunks), [&](size_t chunk) {
    uint64_t state = seed ^ (0x632be59bd9b4e019ull * (chunk + 1));
    const int64_t begin = static_cast<int64_t>(chunk) * kChunk;
    const int64_t end = std::min(n, begin + kChunk);
    for (int64_t i = begin; i < end; ++i) {
      const float u = static_cast<float>(splitmix64(state) >> 40) * (1.0f / 16777216.0f);  // [0, 1)
      const float v = (2.0f * u - 1.0f) * amplitude;
      switch (dtype) {
        case DType::F32: reinterpret_cast<float*>(data)[i] = v; break;
        case DType::BF16: reinterpret_cast<uint16_t*>(data)[i] = f32_to_bf16(v); break;
        case DType::F16: reinterpret_cast<uint16_t*>(data)[i] = f32_to_f16(v); break;
        default: break;
      }
    }
  });
}

}  // namespace

const std::vector<std::string>& synthetic_names() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> v;
    for (const Shape& s : kShapes) v.push_back(s.name);
    for (const ConfigShape& s : kConfigShapes) v.push_back(s.name);
    return v;
  }();
  return names;
}

ModelConfig synthetic_config(const std::string& name) {
  for (const Shape& s : kShapes) {
    if (name != s.name) continue;
    ModelConfig c;
    apply_family_traits(s.family, c);
    c.hidden = s.hidden;
    c.n_layers = s.layers;
    c.n_heads = s.heads;
    c.n_kv_heads = s.kv_heads;
    c.head_dim = s.hidden / s.heads;
    c.intermediate = s.ffn;
    c.vocab = s.vocab;
    c.max_positions = 8192;
    c.norm_eps = 1e-5f;
    c.tie_embeddings = s.tied;
    c.rope.theta = s.rope_theta;
    if (s.llama3_rope) c.rope.type = RopeType::Llama3;
    c.layer_sliding.assign(static_cast<size_t>(c.n_layers), false);
    c.bos_ids = {1};
    c.eos_ids = {2};
    return c;
  }
  for (const ConfigShape& s : kConfigShapes)
    if (name == s.name) return parse_hf_config(s.config_json, std::string("synthetic ") + s.name);
  std::string list;
  for (const auto& n : synthetic_names()) list += (list.empty() ? "" : ", ") + n;
  throw Error("unknown synthetic model '" + name + "' (known: " + list + ")");
}

std::unique_ptr<Model> make_synthetic_model(const ModelConfig& c, DType dtype, uint64_t seed, ThreadPool& pool,
                                            const QuantRecipe* recipe, SyntheticWeights how) {
  check(dtype == DType::F32 || dtype == DType::BF16 || dtype == DType::F16,
        "synthetic models are built in f32, f16 or bf16");
  auto tensors = std::make_unique<MemoryTensors>();
  // Matrices are allocated untouched (no memory yet); they are filled one at a time below.
  auto matrix = [&](const std::string& name, int64_t rows, int64_t cols) { tensors->add(name, dtype, {rows, cols}); };
  auto vector = [&](const std::string& name, int64_t size, float value) {
    float* data = reinterpret_cast<float*>(tensors->add(name, DType::F32, {size}));
    std::fill(data, data + size, value);
  };
  const float norm_one = c.norm_unit_offset ? 0.0f : 1.0f;
  matrix("model.embed_tokens.weight", c.vocab, c.hidden);
  if (!c.tie_embeddings) matrix("lm_head.weight", c.vocab, c.hidden);
  vector("model.norm.weight", c.hidden, norm_one);
  for (int64_t i = 0; i < c.n_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    if (c.fused_qkv) {
      matrix(p + "self_attn.qkv_proj.weight", c.q_dim() + 2 * c.kv_dim(), c.hidden);
    } else {
      matrix(p + "self_attn.q_proj.weight", c.q_dim(), c.hidden);
      matrix(p + "self_attn.k_proj.weight", c.kv_dim(), c.hidden);
      matrix(p + "self_attn.v_proj.weight", c.kv_dim(), c.hidden);
    }
    matrix(p + "self_attn.o_proj.weight", c.hidden, c.q_dim());
    if (c.fused_gate_up) {
      matrix(p + "mlp.gate_up_proj.weight", 2 * c.intermediate, c.hidden);
    } else {
      matrix(p + "mlp.gate_proj.weight", c.intermediate, c.hidden);
      matrix(p + "mlp.up_proj.weight", c.intermediate, c.hidden);
    }
    matrix(p + "mlp.down_proj.weight", c.hidden, c.intermediate);
    vector(p + "input_layernorm.weight", c.hidden, norm_one);
    vector(p + "post_attention_layernorm.weight", c.hidden, norm_one);
    if (c.sandwich_norms) {
      vector(p + "pre_feedforward_layernorm.weight", c.hidden, norm_one);
      vector(p + "post_feedforward_layernorm.weight", c.hidden, norm_one);
    }
    if (c.qk_norm) {
      vector(p + "self_attn.q_norm.weight", c.head_dim, norm_one);
      vector(p + "self_attn.k_norm.weight", c.head_dim, norm_one);
    }
    if (c.attn_qkv_bias) {
      vector(p + "self_attn.q_proj.bias", c.q_dim(), 0.0f);
      vector(p + "self_attn.k_proj.bias", c.kv_dim(), 0.0f);
      vector(p + "self_attn.v_proj.bias", c.kv_dim(), 0.0f);
    }
  }
  auto model = Model::from_source(c, std::move(tensors));
  std::vector<TensorPlan> plan;
  if (recipe != nullptr) plan = plan_quantization(*model, *recipe);
  const float amplitude = 0.02f * std::sqrt(3.0f);  // U(-a, a) has std a / sqrt(3)
  auto matrices = model->named_matrices();
  for (size_t i = 0; i < matrices.size(); ++i) {
    Matrix& m = *matrices[i].second;
    uint8_t* data = const_cast<uint8_t*>(m.data);  // this model owns the (still unwritten) storage
    uint64_t tensor_seed = seed + i;
    if (how != SyntheticWeights::Quantized) {
      // The float storage stays untouched (no memory); the matrix takes its target format.
      if (recipe != nullptr) {
        m.type = plan[i].to;
        m.double_quant = plan[i].double_quant;
        m.outlier_threshold = plan[i].outlier_threshold;
      } else {
        m.type = dtype == DType::F32 ? QuantType::F32 : dtype == DType::F16 ? QuantType::F16 : QuantType::BF16;
      }
      const uint64_t matrix_seed = splitmix64(tensor_seed);
      if (how == SyntheticWeights::RandomRowsOnGpu && matrices[i].first != "embedding") {
        m.data = nullptr;
        m.random_seed = matrix_seed | 1;  // never 0
        continue;
      }
      const size_t row_bytes = m.row_bytes();
      auto storage = std::make_unique<uint8_t[]>(row_bytes * static_cast<size_t>(m.rows));
      constexpr int64_t kRowsPerTask = 256;
      uint8_t* out = storage.get();
      pool.parallel_for(static_cast<size_t>((m.rows + kRowsPerTask - 1) / kRowsPerTask), [&](size_t task) {
        const int64_t end = std::min(m.rows, static_cast<int64_t>(task + 1) * kRowsPerTask);
        for (int64_t r = static_cast<int64_t>(task) * kRowsPerTask; r < end; ++r)
          random_rows::make_row(m.type, m.double_quant, m.cols, matrix_seed | 1, r, out + static_cast<size_t>(r) * row_bytes);
      });
      m.data = out;
      model->adopt(std::move(storage));
      continue;
    }
    fill_random(data, dtype, m.rows * m.cols, amplitude, splitmix64(tensor_seed), pool);
    // Quantize each matrix as soon as it exists, so the 16-bit model is never whole in memory (a tied
    // embedding's floats stay until the output is retied below).
    if (recipe != nullptr) quantize_matrix(*model, m, plan[i], pool, !(c.tie_embeddings && matrices[i].first == "embedding"));
  }
  model->retie_output();  // a tied output takes the embedding's new storage and format
  return model;
}

}  // namespace bioquant
