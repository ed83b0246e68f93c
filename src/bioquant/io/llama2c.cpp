#include "bioquant/io/llama2c.h"

#include <cstring>
#include <filesystem>
#include <optional>
#include <vector>

#include "bioquant/core/error.h"
#include "bioquant/core/mapped_file.h"

namespace bioquant {
namespace {

struct Header {
  int64_t dim = 0, hidden = 0, layers = 0, heads = 0, kv_heads = 0, vocab = 0, seq_len = 0;
  bool shared_classifier = true;

  int64_t head_dim() const { return dim / heads; }
  // Floats after the header, in the file's order.
  int64_t floats() const {
    const int64_t kv_dim = kv_heads * head_dim();
    return vocab * dim + layers * dim                        // embedding, attention norms
           + layers * dim * dim + 2 * layers * kv_dim * dim  // wq, wk, wv
           + layers * dim * dim + layers * dim               // wo, ffn norms
           + 3 * layers * hidden * dim + dim                 // w1, w2, w3, final norm
           + seq_len * head_dim()                            // freq_cis_real and _imag (unused)
           + (shared_classifier ? 0 : vocab * dim);
  }
};

constexpr size_t kHeaderBytes = 7 * sizeof(int32_t);

// The header, when it is plausible and describes exactly `file_size` bytes.
std::optional<Header> read_header(const uint8_t* data, size_t file_size) {
  if (file_size < kHeaderBytes) return std::nullopt;
  int32_t v[7];
  std::memcpy(v, data, sizeof v);
  Header h;
  h.dim = v[0];
  h.hidden = v[1];
  h.layers = v[2];
  h.heads = v[3];
  h.kv_heads = v[4];
  h.shared_classifier = v[5] > 0;
  h.vocab = v[5] < 0 ? -static_cast<int64_t>(v[5]) : v[5];
  h.seq_len = v[6];
  const bool sane = h.dim > 0 && h.dim <= 65536 && h.hidden > 0 && h.hidden <= 1 << 20 && h.layers > 0 &&
                    h.layers <= 1024 && h.heads > 0 && h.dim % h.heads == 0 && h.head_dim() % 2 == 0 &&
                    h.kv_heads > 0 && h.heads % h.kv_heads == 0 && h.vocab > 0 && h.vocab <= 1 << 24 &&
                    h.seq_len > 0 && h.seq_len <= 1 << 24;
  if (!sane) return std::nullopt;
  if (static_cast<double>(h.floats()) * 4 + kHeaderBytes != static_cast<double>(file_size)) return std::nullopt;
  return h;
}

}  // namespace

bool is_llama2c_checkpoint(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) return false;
  const auto size = std::filesystem::file_size(path, ec);
  if (ec || size < kHeaderBytes) return false;
  const MappedFile file(path);
  return read_header(file.data(), file.size()).has_value();
}

std::pair<ModelConfig, std::unique_ptr<TensorSource>> load_llama2c(const std::string& path) {
  const MappedFile file(path);
  const auto header = read_header(file.data(), file.size());
  check(header.has_value(), path + ": not a llama2.c checkpoint (its header does not describe a file of " +
                                std::to_string(file.size()) + " bytes)");
  const Header& h = *header;
  ModelConfig c;
  c.model_type = "llama";
  apply_family_traits(c.model_type, c);
  c.hidden = h.dim;
  c.intermediate = h.hidden;
  c.n_layers = h.layers;
  c.n_heads = h.heads;
  c.n_kv_heads = h.kv_heads;
  c.head_dim = h.head_dim();
  c.vocab = h.vocab;
  c.max_positions = h.seq_len;
  c.norm_eps = 1e-5f;  // run.c's rmsnorm
  c.rope.theta = 10000.0f;
  c.tie_embeddings = h.shared_classifier;
  c.layer_sliding.assign(static_cast<size_t>(c.n_layers), false);
  c.bos_ids = {1};
  c.eos_ids = {2};
  c.dtype = "float32";

  auto tensors = std::make_unique<MemoryTensors>();
  const float* at = reinterpret_cast<const float*>(file.data() + kHeaderBytes);  // 28 bytes in: 4-aligned
  // Copies the next rows x cols floats into a tensor; `row_of` maps a destination row to its source row.
  const auto take = [&](const std::string& name, int64_t rows, int64_t cols, const auto& row_of) {
    float* dst = reinterpret_cast<float*>(
        tensors->add(name, DType::F32, cols == 1 ? std::vector<int64_t>{rows} : std::vector<int64_t>{rows, cols}));
    for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * cols, at + row_of(r) * cols, cols * sizeof(float));
    at += rows * cols;
  };
  const auto same = [](int64_t r) { return r; };
  // Rotate-half row r of a head comes from interleaved row 2r (first half) or 2(r - half) + 1.
  const int64_t hd = c.head_dim, half = hd / 2;
  const auto rotate_half = [hd, half](int64_t r) {
    const int64_t head = r / hd, i = r % hd;
    return head * hd + (i < half ? 2 * i : 2 * (i - half) + 1);
  };
  const int64_t kv_dim = c.kv_dim();
  auto per_layer = [&](const std::string& suffix, int64_t rows, int64_t cols, const auto& row_of) {
    for (int64_t l = 0; l < c.n_layers; ++l)
      take("model.layers." + std::to_string(l) + "." + suffix, rows, cols, row_of);
  };
  take("model.embed_tokens.weight", c.vocab, c.hidden, same);
  per_layer("input_layernorm.weight", c.hidden, 1, same);
  per_layer("self_attn.q_proj.weight", c.hidden, c.hidden, rotate_half);
  per_layer("self_attn.k_proj.weight", kv_dim, c.hidden, rotate_half);
  per_layer("self_attn.v_proj.weight", kv_dim, c.hidden, same);
  per_layer("self_attn.o_proj.weight", c.hidden, c.hidden, same);
  per_layer("post_attention_layernorm.weight", c.hidden, 1, same);
  per_layer("mlp.gate_proj.weight", c.intermediate, c.hidden, same);  // w1
  per_layer("mlp.down_proj.weight", c.hidden, c.intermediate, same);  // w2
  per_layer("mlp.up_proj.weight", c.intermediate, c.hidden, same);    // w3
  take("model.norm.weight", c.hidden, 1, same);
  at += h.seq_len * hd;  // freq_cis_real, freq_cis_imag
  if (!h.shared_classifier) take("lm_head.weight", c.vocab, c.hidden, same);
  return {std::move(c), std::move(tensors)};
}

}  // namespace bioquant
