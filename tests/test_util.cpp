#include "test_util.h"

#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <stdexcept>

#include "bioquant/core/error.h"
#include "bioquant/io/safetensors.h"

namespace bioquant::test {

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TempDir::TempDir() {
  const char* base = std::getenv("TMPDIR");
  std::string templ = std::string(base ? base : "/tmp") + "/bioquant-test-XXXXXX";
  if (::mkdtemp(templ.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
  path_ = templ;
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

void write_file(const std::string& path, const std::string& content) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << content;
  if (!out) throw std::runtime_error("cannot write " + path);
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void copy_file(const std::string& from, const std::string& to) { write_file(to, read_file(from)); }

std::string tiny_llama_config_json() {
  return R"({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
  "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
  "vocab_size": 64, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "max_position_embeddings": 128,
  "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"})";
}

void write_tiny_llama(const std::string& dir, const std::string& skip, const std::string& reshape) {
  write_file(dir + "/config.json", tiny_llama_config_json());
  struct Spec {
    std::string name;
    std::vector<int64_t> shape;
  };
  std::vector<Spec> specs{{"model.embed_tokens.weight", {64, 32}}, {"lm_head.weight", {64, 32}}, {"model.norm.weight", {32}}};
  for (int i = 0; i < 2; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    specs.push_back({p + "self_attn.q_proj.weight", {32, 32}});
    specs.push_back({p + "self_attn.k_proj.weight", {16, 32}});
    specs.push_back({p + "self_attn.v_proj.weight", {16, 32}});
    specs.push_back({p + "self_attn.o_proj.weight", {32, 32}});
    specs.push_back({p + "mlp.gate_proj.weight", {64, 32}});
    specs.push_back({p + "mlp.up_proj.weight", {64, 32}});
    specs.push_back({p + "mlp.down_proj.weight", {32, 64}});
    specs.push_back({p + "input_layernorm.weight", {32}});
    specs.push_back({p + "post_attention_layernorm.weight", {32}});
  }
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 0.1f);
  std::vector<std::vector<float>> storage;
  std::vector<TensorView> views;
  for (Spec& s : specs) {
    if (s.name == skip) continue;
    if (s.name == reshape) s.shape = {3, 3};
    int64_t n = 1;
    for (int64_t d : s.shape) n *= d;
    storage.emplace_back(static_cast<size_t>(n));
    for (float& v : storage.back()) v = (s.shape.size() == 1 ? 1.0f : 0.0f) + normal(rng);
    TensorView v;
    v.name = s.name;
    v.dtype = DType::F32;
    v.shape = s.shape;
    v.data = reinterpret_cast<const uint8_t*>(storage.back().data());
    v.nbytes = static_cast<size_t>(n) * 4;
    views.push_back(v);
  }
  write_safetensors(dir + "/model.safetensors", views);
}

CliResult run_cli(const std::vector<std::string>& args) {
  TempDir tmp;
  std::string cmd = "'" + std::string(BIOQUANT_CLI) + "'";
  for (const std::string& a : args) {
    std::string quoted = "'";
    for (char c : a) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
    cmd += " " + quoted + "'";
  }
  cmd += " > '" + tmp.file("out") + "' 2> '" + tmp.file("err") + "' < /dev/null";
  const int status = std::system(cmd.c_str());
  CliResult r;
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
  r.out = read_file(tmp.file("out"));
  r.err = read_file(tmp.file("err"));
  return r;
}

std::vector<uint8_t> pack_q5_0_block(const uint8_t* levels, uint16_t d) {
  std::vector<uint8_t> b(22, 0);
  std::memcpy(b.data(), &d, 2);
  uint32_t qh = 0;
  for (int j = 0; j < 16; ++j) {
    const uint8_t x0 = levels[j], x1 = levels[j + 16];
    b[6 + j] = static_cast<uint8_t>((x0 & 0x0F) | ((x1 & 0x0F) << 4));
    qh |= ((x0 & 0x10u) >> 4) << (j + 0);
    qh |= ((x1 & 0x10u) >> 4) << (j + 16);
  }
  std::memcpy(b.data() + 2, &qh, 4);
  return b;
}

std::vector<uint8_t> pack_q3_k_block(const uint8_t* levels, const uint8_t* scales, uint16_t d) {
  std::vector<uint8_t> b(110, 0);
  uint8_t* hmask = b.data();
  uint8_t* qs = b.data() + 32;
  uint8_t* sc = b.data() + 96;
  for (int j = 0; j < 16; ++j) {
    int l = scales[j];
    if (j < 8) sc[j] = static_cast<uint8_t>(l & 0xF);
    else sc[j - 8] = static_cast<uint8_t>(sc[j - 8] | ((l & 0xF) << 4));
    l >>= 4;
    sc[j % 4 + 8] = static_cast<uint8_t>(sc[j % 4 + 8] | (l << (2 * (j / 4))));
  }
  int L[256];
  for (int j = 0; j < 256; ++j) L[j] = levels[j];
  int m = 0;
  uint8_t hm = 1;
  for (int j = 0; j < 256; ++j) {  // the third bit of the first 32 levels in bit 0, the next 32 in bit 1, ...
    if (L[j] > 3) {
      hmask[m] = static_cast<uint8_t>(hmask[m] | hm);
      L[j] -= 4;
    }
    if (++m == 32) {
      m = 0;
      hm = static_cast<uint8_t>(hm << 1);
    }
  }
  for (int j = 0; j < 256; j += 128)
    for (int l = 0; l < 32; ++l)
      qs[j / 4 + l] = static_cast<uint8_t>(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6));
  std::memcpy(b.data() + 108, &d, 2);
  return b;
}

std::string fixtures_dir() { return BIOQUANT_FIXTURES; }

std::string shared_dir() {
  const std::string candidate = std::string(BIOQUANT_FIXTURES) + "/../../../shared";
  struct stat st {};
  return ::stat(candidate.c_str(), &st) == 0 ? candidate : "";
}

}  // namespace bioquant::test
