#include "bioquant/report/estimate.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <map>
#include <cstdio>
#include <memory>

#include "bioquant/core/error.h"
#include "bioquant/core/mapped_file.h"
#include "bioquant/core/thread_pool.h"
#include "bioquant/io/gguf.h"
#include "bioquant/io/llama2c.h"
#include "bioquant/io/tensor_source.h"
#include "bioquant/kernels/cuda/gpu_memory_plan.h"
#include "bioquant/model/model.h"
#include "bioquant/model/synthetic.h"

namespace bioquant::report {

using nlohmann::json;

namespace {

constexpr double kMiB = 1024.0 * 1024.0;
constexpr double kGiB = kMiB * 1024.0;

// The tensors a config calls for, with their shapes and no data: matrices get a distinct dummy
// pointer each (planning never reads them; distinct so a separate output is not taken for a tied
// one), vectors real zeros (the binder copies norms). Mirrors bind_layer in model/model.cpp; the
// study test checks the plans agree with a real load.
class ShapeOnlyTensors : public TensorSource {
 public:
  ShapeOnlyTensors(const ModelConfig& c, DType stored) {
    const int64_t h = c.hidden, q = c.q_dim(), kv = c.kv_dim(), ff = c.intermediate;
    matrix("model.embed_tokens.weight", stored, c.vocab, h);
    if (!c.tie_embeddings) matrix("lm_head.weight", stored, c.vocab, h);
    vector("model.norm.weight", h);
    for (int64_t i = 0; i < c.n_layers; ++i) {
      const std::string p = "model.layers." + std::to_string(i) + ".";
      if (c.fused_qkv) {
        matrix(p + "self_attn.qkv_proj.weight", stored, q + 2 * kv, h);
      } else {
        matrix(p + "self_attn.q_proj.weight", stored, q, h);
        matrix(p + "self_attn.k_proj.weight", stored, kv, h);
        matrix(p + "self_attn.v_proj.weight", stored, kv, h);
      }
      matrix(p + "self_attn.o_proj.weight", stored, h, q);
      if (c.attn_qkv_bias) {
        vector(p + "self_attn.q_proj.bias", q);
        vector(p + "self_attn.k_proj.bias", kv);
        vector(p + "self_attn.v_proj.bias", kv);
      }
      if (c.attn_out_bias) vector(p + "self_attn.o_proj.bias", h);
      if (c.fused_gate_up) {
        matrix(p + "mlp.gate_up_proj.weight", stored, 2 * ff, h);
      } else {
        matrix(p + "mlp.gate_proj.weight", stored, ff, h);
        matrix(p + "mlp.up_proj.weight", stored, ff, h);
      }
      matrix(p + "mlp.down_proj.weight", stored, h, ff);
      if (c.mlp_bias) {
        vector(p + "mlp.gate_proj.bias", ff);
        vector(p + "mlp.up_proj.bias", ff);
        vector(p + "mlp.down_proj.bias", h);
      }
      vector(p + "input_layernorm.weight", h);
      vector(p + "post_attention_layernorm.weight", h);
      if (c.sandwich_norms) {
        vector(p + "pre_feedforward_layernorm.weight", h);
        vector(p + "post_feedforward_layernorm.weight", h);
      }
      if (c.qk_norm) {
        vector(p + "self_attn.q_norm.weight", c.head_dim);
        vector(p + "self_attn.k_norm.weight", c.head_dim);
      }
    }
  }

  const TensorView* find(const std::string& name) const override {
    auto it = views_.find(name);
    return it == views_.end() ? nullptr : &it->second;
  }

 private:
  void matrix(const std::string& name, DType dtype, int64_t rows, int64_t cols) {
    auto dummy = std::make_unique<uint8_t[]>(16);
    add(name, dtype, {rows, cols}, dummy.get());
    owned_.push_back(std::move(dummy));
  }
  void vector(const std::string& name, int64_t size) {
    auto zeros = std::make_unique<uint8_t[]>(static_cast<size_t>(size) * sizeof(float));
    std::fill(zeros.get(), zeros.get() + size * static_cast<int64_t>(sizeof(float)), uint8_t{0});
    add(name, DType::F32, {size}, zeros.get());
    owned_.push_back(std::move(zeros));
  }
  void add(const std::string& name, DType dtype, std::vector<int64_t> shape, const uint8_t* data) {
    TensorView v;
    v.name = name;
    v.dtype = dtype;
    v.shape = std::move(shape);
    v.data = data;
    v.nbytes = static_cast<size_t>(v.numel()) * dtype_size(dtype);
    views_[name] = std::move(v);
  }

  std::map<std::string, TensorView> views_;
  std::vector<std::unique_ptr<uint8_t[]>> owned_;
};

DType parse_storage_dtype(const std::string& name, const std::string& where) {
  std::string s = name;
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char ch) { return std::tolower(ch); });
  if (s == "bf16" || s == "bfloat16" || s == "torch.bfloat16") return DType::BF16;
  if (s == "f16" || s == "float16" || s == "half" || s == "torch.float16") return DType::F16;
  if (s == "f32" || s == "float32" || s == "float" || s == "torch.float32") return DType::F32;
  throw Error(where + ": storage dtype '" + name + "' is not one BioQuant loads (bf16, f16, f32)");
}

// Bytes of int8-activation scratch one thread holds per token and input column (qgemm_impl.h's
// quantize_activations: q 1 + d 1/8 + s 1/8 + s16 1/4; the SIMD kernels' lanes e 1 + cc 1 + ds 1/8).
// nf4/fp4 then widen the activations to int16 in cc's slot (2): the slot is reallocated and the
// lanes buffer it held stays with the allocator (+1 more); q4_0 regroups them in units (qxu in cc's
// slot, same size; eu 1 in ds's slot, +1/8 left behind).
double scratch_per_token_col(QuantType t) {
  switch (t) {
    case QuantType::F32:
    case QuantType::F16:
    case QuantType::BF16: return 0.0;
    case QuantType::NF4:
    case QuantType::FP4: return 5.625;
    case QuantType::Q4_0: return 4.625;
    default: return 3.625;
  }
}

}  // namespace

ModelShape model_shape_from_path(const std::string& path, const std::string& dtype_override) {
  ModelShape s;
  s.path = path;
  // GGUF files hold no config.json, and loading one copies its Q/K rows (gguf_model.h): not
  // something to size without loading.
  check(!is_gguf_path(path),
        path + ": estimate sizes a Hugging Face model from its config.json; for a GGUF file use bioquant info "
               "--model FILE.gguf (it maps the file)");
  check(!is_llama2c_checkpoint(path),
        path + ": estimate sizes a Hugging Face model from its config.json; for a llama2.c checkpoint use bioquant "
               "info --model FILE");
  s.config = load_model_config(path);
  const json raw = json::parse(read_text_file(path + "/config.json"), nullptr, false);
  check(!(raw.is_object() && raw.contains("quantization_config")),
        path + "/config.json: a pre-quantized checkpoint (quantization_config); estimate sizes models stored in "
               "f32/f16/bf16 (bioquant info --model DIR sizes this one from its files)");
  s.source = "config.json";
  s.stored = s.config.dtype.empty() ? DType::F32 : parse_storage_dtype(s.config.dtype, path + "/config.json");
  if (!dtype_override.empty()) s.stored = parse_storage_dtype(dtype_override, "--dtype");
  return s;
}

ModelShape model_shape_synthetic(const std::string& name, const std::string& dtype) {
  ModelShape s;
  s.config = synthetic_config(name);
  s.stored = parse_storage_dtype(dtype, "--dtype");
  s.source = "synthetic";
  s.path = "synthetic:" + name;
  return s;
}

double runtime_overhead_bytes() {
  // Peak RSS of `bioquant bench --synthetic tiny -p 1 -n 1 -r 1 --no-bandwidth` (11.1-11.3 MiB) less
  // its model (0.8 MiB): the binary, libstdc++/PCRE2/SentencePiece/OpenSSL/SQLite/httplib, glibc
  // arenas and thread stacks on x86-64 Debian 12, 2 threads. Measured once, not fitted to the runs
  // the estimate is checked against (the study test re-measures it).
  return 10.5 * kMiB;
}

namespace {

constexpr int kH100Sms = 132;  // the decode attention's default split count depends on the SMs

// The GPU side of estimate_memory (e.plan, e.weights and e.vector_bytes already filled in).
void estimate_gpu(const Model& model, MemoryEstimate& e, KvType kv, const EstimateOptions& o) {
  const ModelConfig& c = model.config();
  const ModelWeights& w = model.weights();
  const auto matrices = model.named_matrices();
  std::map<const Matrix*, const TensorPlan*> planned;
  for (size_t i = 0; i < e.plan.size(); ++i) planned[matrices[i].second] = &e.plan[i];
  const auto plan_of = [&](const Matrix& m) -> const TensorPlan* {
    auto it = planned.find(&m);
    if (it == planned.end() && &m == &w.output) it = planned.find(&w.embed);  // tied: the embedding's format
    return it != planned.end() ? it->second : nullptr;
  };
  e.weights_resident = static_cast<double>(gpu_weight_bytes(model, [&](const Matrix& m) {
    const TensorPlan* p = plan_of(m);
    return p != nullptr ? p->bytes() : m.nbytes();
  }));
  size_t values = 0, scales = 0;
  gpu_kv_sizes(c, o.ctx, kv, values, scales);
  e.kv_cache = 2.0 * static_cast<double>(values + scales);
  e.kv_per_token = e.kv_cache / static_cast<double>(o.ctx);
  e.activations = static_cast<double>(gpu_work_sizes(c, o.batch, 1, gpu_attention_splits(kH100Sms, static_cast<int>(c.n_heads))).bytes());
  // Prompts of 32+ tokens: quantized matrices dequantized to bf16 tile by tile (two buffers, each the
  // largest tile of any matrix, the second only for matrices of several tiles), activations in bf16.
  e.scratch = 0;
  if (o.batch >= kGpuGemmMinTokens) {
    const size_t tile = gpu_gemm_tile_bytes(static_cast<size_t>(e.weights));
    size_t first = 0, second = 0;
    bool any = false;
    for (const TensorPlan& p : e.plan) {
      if (p.name == "embedding" || p.name == "output") continue;  // prompts' layer matmuls only
      if (p.to == QuantType::F32 || p.to == QuantType::F16) continue;  // f32 kernels, no tensor cores
      any = true;
      if (p.to == QuantType::BF16) continue;  // multiplied as stored
      const int64_t rows = gpu_gemm_tile_rows(p.rows, p.cols, tile);
      const size_t bytes = static_cast<size_t>(rows * p.cols) * 2;
      first = std::max(first, bytes);
      if (rows < p.rows) second = std::max(second, bytes);
    }
    const int64_t widest = std::max({c.hidden, c.q_dim(), c.intermediate});
    if (any) e.scratch = static_cast<double>(first + second) + 2.0 * static_cast<double>(o.batch * widest);
  }
  e.runtime = kGpuContextBytes + kGpuCublasBytes;
  e.load_peak = 0;
  e.load_peak_at.clear();
  e.steady = e.weights_resident + e.kv_cache + e.activations + e.scratch;
  e.total = e.runtime + e.steady;
}

}  // namespace

MemoryEstimate estimate_memory(const ModelShape& shape, const EstimateOptions& o) {
  check(o.device == "cpu" || o.device == "cuda", "--device must be cpu or cuda");
  check(o.device == "cuda" || o.kv_cache.empty(), "--kv-cache sizes the GPU's cache: give --device cuda");
  const KvType gpu_kv = o.kv_cache.empty() ? KvType::BF16 : parse_kv_type(o.kv_cache);
  check(o.ctx > 0, "--ctx must be positive");
  check(o.batch > 0, "--batch must be positive");
  const ModelConfig& c = shape.config;
  MemoryEstimate e;
  e.threads = o.threads > 0 ? o.threads : ThreadPool::hardware_threads();

  const auto model = Model::from_source(c, std::make_unique<ShapeOnlyTensors>(c, shape.stored));
  std::optional<QuantRecipe> recipe;
  if (!o.quant.empty()) recipe = parse_quant_recipe(o.quant, o.double_quant, o.quant_policy);
  if (recipe) {
    e.plan = plan_quantization(*model, *recipe);
  } else {
    check(!o.double_quant, "--double-quant needs --quant nf4 or fp4");
    for (const auto& [name, m] : model->named_matrices())
      e.plan.push_back({name, m->rows, m->cols, m->type, m->type, m->double_quant, 0.0f, ""});
  }

  // Weights as held, and the load: matrices converted in order (quantize_model / the synthetic
  // builder), each source resident while its new storage is written.
  const bool tied_shared = c.tie_embeddings;
  double resident = 0, peak = 0, steady_matrices = 0;
  int64_t max_cols = 0;
  double scratch_rate = 0;
  const auto matrices = model->named_matrices();
  for (size_t i = 0; i < e.plan.size(); ++i) {
    const TensorPlan& p = e.plan[i];
    const Matrix& m = *matrices[i].second;
    const double to_bytes = static_cast<double>(p.bytes());
    const double from_bytes = static_cast<double>(m.nbytes());
    const std::string f = std::string(quant_traits(p.to).name) + (p.double_quant ? "+dq" : "");
    e.weights_by_format[f].bytes += to_bytes;
    e.weights_by_format[f].parameters += static_cast<double>(p.rows * p.cols);
    e.matrix_bytes += to_bytes;
    const bool converts = p.to != m.type || p.double_quant != m.double_quant;
    if (converts) {
      const bool keeps_source = shape.source != "synthetic" && tied_shared && p.name == "embedding";
      if (resident + from_bytes + to_bytes > peak) {
        peak = resident + from_bytes + to_bytes;
        e.load_peak_at = p.name;
      }
      resident += to_bytes + (keeps_source ? from_bytes : 0.0);
      steady_matrices += to_bytes + (keeps_source ? from_bytes : 0.0);
    } else if (shape.source == "synthetic") {
      resident += from_bytes;  // written when built
      steady_matrices += from_bytes;
    } else {
      // Mapped and kept as stored: paged in by use. The embedding counts whole too: the kernel maps
      // file pages around each fault (fault-around, large page-cache folios), so the rows of a few
      // dozen tokens already map nearly all of it (68 tokens mapped all 62.5 MiB of a 32000-row one,
      // Linux 6.18 / ext4).
      steady_matrices += from_bytes;
    }
    if (resident > peak) {
      peak = resident;
      e.load_peak_at = p.name;
    }
    if (p.name != "embedding" && p.name != "output") {
      max_cols = std::max(max_cols, p.cols);
      scratch_rate = std::max(scratch_rate, scratch_per_token_col(p.to));
    }
    // (The output projection runs on one token per step: its scratch is a rounding error.)
  }
  e.vector_bytes = static_cast<double>(model->weight_bytes());
  for (const auto& [name, m] : model->named_matrices()) e.vector_bytes -= static_cast<double>(m->nbytes());
  e.weights = e.matrix_bytes + e.vector_bytes;
  e.load_peak = peak + e.vector_bytes;

  if (o.device == "cuda") {
    estimate_gpu(*model, e, gpu_kv, o);
    return e;
  }
  e.kv_per_token = 2.0 * static_cast<double>(c.n_layers * c.kv_dim()) * sizeof(float);
  e.kv_cache = e.kv_per_token * static_cast<double>(o.ctx);
  const double n = static_cast<double>(o.batch);
  // Decoder::forward: x, h [n, hidden]; q, attn [n, q_dim]; k, v [n, kv_dim]; gate, up [n, ffn];
  // cos, sin [n, rotary/2]; plus next-token logits [vocab].
  e.activations = 4.0 * (n * (2.0 * c.hidden + 2.0 * c.q_dim() + 2.0 * c.kv_dim() + 2.0 * c.intermediate +
                              c.rotary_dim()) + c.vocab);
  // Attention scores: one row of up to ctx floats per thread.
  e.scratch = e.threads * (scratch_rate * n * static_cast<double>(max_cols) + 4.0 * static_cast<double>(o.ctx));
  e.runtime = runtime_overhead_bytes();
  e.weights_resident = steady_matrices + e.vector_bytes;
  e.steady = e.weights_resident + e.kv_cache + e.activations + e.scratch;
  e.total = e.runtime + std::max(e.load_peak, e.steady);
  return e;
}

json MemoryEstimate::to_json() const {
  json formats = json::object();
  for (const auto& [f, b] : weights_by_format)
    formats[f] = {{"bytes", b.bytes}, {"parameters", b.parameters}, {"bits_per_weight", 8.0 * b.bytes / b.parameters}};
  json fallbacks = json::array();
  for (const TensorPlan& p : plan)
    if (!p.note.empty()) fallbacks.push_back({{"tensor", p.name}, {"note", p.note}});
  return {{"weights", weights},
          {"weights_by_format", formats},
          {"norms_and_biases_f32", vector_bytes},
          {"weights_resident", weights_resident},
          {"load_peak", load_peak},
          {"load_peak_at", load_peak_at},
          {"kv_cache", kv_cache},
          {"kv_cache_per_token", kv_per_token},
          {"activations", activations},
          {"scratch", scratch},
          {"runtime", runtime},
          {"steady", steady},
          {"total", total},
          {"threads", threads},
          {"fallbacks", fallbacks}};
}

double parse_byte_size(const std::string& text) {
  std::string s;
  for (char ch : text)
    if (!std::isspace(static_cast<unsigned char>(ch))) s += ch;
  size_t used = 0;
  double value = 0;
  try {
    value = std::stod(s, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  check(used > 0 && std::isfinite(value) && value > 0,
        "'" + text + "' is not a memory size (examples: 40GiB, 512MiB, 24GB, 1e9)");
  std::string unit = s.substr(used);
  std::transform(unit.begin(), unit.end(), unit.begin(), [](unsigned char ch) { return std::tolower(ch); });
  const std::pair<const char*, double> units[] = {
      {"", 1},          {"b", 1},          {"k", 1024},      {"kib", 1024},    {"kb", 1e3},
      {"m", kMiB},      {"mib", kMiB},     {"mb", 1e6},      {"g", kGiB},      {"gib", kGiB},
      {"gb", 1e9},      {"t", kGiB * 1024}, {"tib", kGiB * 1024}, {"tb", 1e12}};
  for (const auto& [name, scale] : units)
    if (unit == name) return value * scale;
  throw Error("'" + text + "': unknown unit '" + s.substr(used) + "' (use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB)");
}

std::string format_bytes(double bytes) {
  char buf[32];
  if (bytes >= kGiB) std::snprintf(buf, sizeof buf, "%.2f GiB", bytes / kGiB);
  else std::snprintf(buf, sizeof buf, "%.1f MiB", bytes / kMiB);
  return buf;
}

}  // namespace bioquant::report
