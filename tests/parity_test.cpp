// Logits and greedy continuations against HF transformers references (tests/fixtures/models,
// made by tools/make_model_fixtures.py). Tolerance: max|logit - ref| <= 1e-3 * max(1, max|ref|),
// argmax identical at every position, greedy continuation identical.
//
// BF16 and F16 copies use the SAME tolerance: their references were computed by HF from the
// same rounded weights upcast to f32, which is exactly what this engine does (16-bit storage,
// f32 compute), so only summation order separates the two.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "bioquant/core/error.h"
#include "bioquant/core/thread_pool.h"
#include "bioquant/kernels/cpu/cpu_kernels.h"
#include "bioquant/kernels/cpu/ops.h"
#include "bioquant/engine/generator.h"
#include "bioquant/io/hf_config.h"
#include "bioquant/model/decoder.h"
#include "bioquant/tokenizer/tokenizer.h"
#include "test_util.h"

namespace bioquant {
namespace {

using nlohmann::json;

std::string models_dir() { return test::fixtures_dir() + "/models"; }

std::vector<float> read_logits(const std::string& path) {
  const std::string bytes = test::read_file(path);
  std::vector<float> out(bytes.size() / sizeof(float));
  std::memcpy(out.data(), bytes.data(), out.size() * sizeof(float));
  return out;
}

// Every position's logits within 1e-3 * max(1, max|ref|) of the reference's, and the same argmax.
void expect_logits_match(const std::vector<float>& got, const std::vector<float>& want,
                         const std::vector<int32_t>& want_argmax, int64_t n, int64_t vocab, const std::string& where) {
  for (int64_t t = 0; t < n; ++t) {
    const float* g = got.data() + t * vocab;
    const float* w = want.data() + t * vocab;
    float max_ref = 0.0f, max_err = 0.0f;
    for (int64_t i = 0; i < vocab; ++i) {
      max_ref = std::max(max_ref, std::fabs(w[i]));
      max_err = std::max(max_err, std::fabs(g[i] - w[i]));
    }
    EXPECT_LE(max_err, 1e-3f * std::max(1.0f, max_ref)) << where << " position " << t;
    EXPECT_EQ(top_token(g, vocab), want_argmax[static_cast<size_t>(t)]) << where << " position " << t;
  }
}

// `quantize --type f32` of a model directory, written into dir.
std::string f32_gguf(const std::string& model_dir, const test::TempDir& dir) {
  const auto w = test::run_cli({"quantize", "--model", model_dir, "--type", "f32", "--out", dir.file("m.gguf")});
  EXPECT_EQ(w.exit_code, 0) << w.err;
  return dir.file("m.gguf");
}

// `info` on a copy of a GGUF file whose `name` (a key or tensor name) has its letter `at` replaced, so
// the file no longer holds it.
test::CliResult info_without(const std::string& gguf, const std::string& name, size_t at, const test::TempDir& dir) {
  std::string bytes = test::read_file(gguf);
  const size_t where = bytes.find(name);
  EXPECT_NE(where, std::string::npos) << name;
  if (where != std::string::npos) bytes[where + at] = 'X';
  test::write_file(dir.file("damaged.gguf"), bytes);
  return test::run_cli({"info", "--model", dir.file("damaged.gguf")});
}

// Checks one model directory against one reference (variant's reference.json + dtype key).
void check_parity(const std::string& model_dir, const std::string& variant, const std::string& dtype) {
  try {
    cpu_kernels();  // BIOQUANT_CPU_ISA may name a path this CPU lacks
  } catch (const Error& e) {
    GTEST_SKIP() << e.what();
  }
  const json ref = json::parse(test::read_file(models_dir() + "/" + variant + "/reference.json"));
  const std::vector<int32_t> tokens = ref["tokens"].get<std::vector<int32_t>>();
  const std::vector<int32_t> want_argmax = ref[dtype]["argmax"].get<std::vector<int32_t>>();
  const std::vector<int32_t> want_greedy = ref[dtype]["greedy"].get<std::vector<int32_t>>();
  const std::vector<float> want = read_logits(models_dir() + "/" + variant + "/logits_" + dtype + ".bin");

  auto model = Model::load(model_dir);
  const int64_t vocab = model->config().vocab;
  const int64_t n = static_cast<int64_t>(tokens.size());
  ASSERT_EQ(want.size(), static_cast<size_t>(n * vocab));
  ThreadPool pool(2);
  Decoder decoder(*model, pool);
  KVCache cache(model->config(), n);
  std::vector<float> got(static_cast<size_t>(n * vocab));
  decoder.forward(tokens.data(), n, cache, n, got.data());

  expect_logits_match(got, want, want_argmax, n, vocab, model_dir);

  // Greedy continuation through the KV cache, one token at a time.
  GenerateOptions options;
  options.max_new_tokens = static_cast<int64_t>(want_greedy.size());
  options.stop_at_eos = false;
  const GenerateResult r = generate(decoder, tokens, options);
  EXPECT_EQ(r.tokens, want_greedy) << model_dir;
}

class Parity : public ::testing::TestWithParam<std::tuple<std::string, std::string>> {};

TEST_P(Parity, MatchesTransformers) {
  const auto& [variant, dtype] = GetParam();
  check_parity(models_dir() + "/" + variant + "/" + dtype, variant, dtype);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, Parity,
                         ::testing::Combine(::testing::Values("llama", "llama3rope", "mistral", "qwen2", "qwen3",
                                                              "gemma2", "phi3"),
                                            ::testing::Values("f32", "bf16", "f16")),
                         [](const auto& info) { return std::get<0>(info.param) + "_" + std::get<1>(info.param); });

// Longrope (Phi-3.5, Phi-4-mini) on its long side: the fixture's 32-token prompt is past its 16-position
// original context. f32 only (the 16-bit roundings are the phi3 variant's).
// And YaRN (Qwen2.5, Qwen3 long-context configs): factor 4 over a 64-position original context.
INSTANTIATE_TEST_SUITE_P(ScaledRope, Parity,
                         ::testing::Combine(::testing::Values("phi3longrope", "qwen2yarn"), ::testing::Values("f32")),
                         [](const auto& info) { return std::get<0>(info.param) + "_" + std::get<1>(info.param); });

// YaRN's frequencies (the ramp between kept and divided ones) and attention factor are transformers' own:
// its inv_freq buffer is in the fixture.
TEST(ParityVariants, YarnFrequenciesAreTransformers) {
  const json ref = json::parse(test::read_file(models_dir() + "/qwen2yarn/reference.json"));
  auto model = Model::load(models_dir() + "/qwen2yarn/f32");
  const ModelConfig& c = model->config();
  ASSERT_EQ(c.rope.type, RopeType::Yarn);
  EXPECT_FLOAT_EQ(c.rope.attention_factor, ref["checks"]["attention_scaling"].get<float>());
  const std::vector<float> want = ref["inv_freq"]["model.rotary_emb.inv_freq"].get<std::vector<float>>();
  std::vector<float> got(static_cast<size_t>(c.rotary_dim() / 2));
  rope_inv_freq(c.rope, c.rotary_dim(), got.data());
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], 2e-7f * want[i]) << "pair " << i;

  // A config whose max_position_embeddings equals the original context (as Qwen's model cards have
  // it): transformers keeps the factor, and so does BioQuant.
  const json& probe = ref["checks"]["probe_max_equals_original"];
  std::string config = test::read_file(models_dir() + "/qwen2yarn/f32/config.json");
  const std::string from = "\"max_position_embeddings\": 256";
  ASSERT_NE(config.find(from), std::string::npos);
  config.replace(config.find(from), from.size(), "\"max_position_embeddings\": 64");
  const ModelConfig same = parse_hf_config(config, "config.json");
  EXPECT_FLOAT_EQ(same.rope.factor, 4.0f);
  EXPECT_FLOAT_EQ(same.rope.attention_factor, probe["attention_scaling"].get<float>());
  const std::vector<float> probe_freq = probe["inv_freq"].get<std::vector<float>>();
  rope_inv_freq(same.rope, same.rotary_dim(), got.data());
  for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], probe_freq[i], 2e-7f * probe_freq[i]) << "pair " << i;

  // In a GGUF file (llama.cpp's keys); one without its factor is refused by name.
  test::TempDir dir;
  const std::string gguf = f32_gguf(models_dir() + "/qwen2yarn/f32", dir);
  const auto info = test::run_cli({"info", "--model", gguf});
  EXPECT_NE(info.out.find("rope         yarn, theta 10000, rotary dim 16 (factor 4 over 64 positions, attention factor "
                          "1.1386)"),
            std::string::npos)
      << info.out;
  const auto bad = info_without(gguf, "qwen2.rope.scaling.factor", 20, dir);  // "...fXctor"
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.err.find("yarn scaling needs a positive rope.scaling.factor"), std::string::npos) << bad.err;
}

// Its short side and the switch: a 16-token forward takes the short factors; a greedy continuation of 8
// tokens through the KV cache takes them until its step's position passes 16, then the long ones, and
// the cached positions keep theirs, as HF's cached generation does. Also through a GGUF file, where the
// factors travel as llama.cpp's rope_factors_long / rope_factors_short tensors.
TEST(ParityVariants, LongRopeShortContextAndCachedCrossing) {
  const std::string variant_dir = models_dir() + "/phi3longrope";
  const json ref = json::parse(test::read_file(variant_dir + "/reference.json"));
  const json& lr = ref["longrope"];
  const std::vector<int32_t> all = ref["tokens"].get<std::vector<int32_t>>();
  const int64_t n_short = lr["short_tokens"].get<int64_t>(), n_prompt = lr["cached_prompt_tokens"].get<int64_t>();
  const std::vector<int32_t> short_tokens(all.begin(), all.begin() + n_short), prompt(all.begin(), all.begin() + n_prompt);
  const std::vector<float> want = read_logits(variant_dir + "/" + lr["short_logits_file"].get<std::string>());
  const std::vector<int32_t> want_argmax = lr["short_argmax"].get<std::vector<int32_t>>();
  const std::vector<int32_t> want_cached = lr["cached_greedy"].get<std::vector<int32_t>>();
  ASSERT_NE(want_cached, lr["reforward_greedy"].get<std::vector<int32_t>>());  // the cache's factors matter here

  test::TempDir dir;
  const std::string gguf = f32_gguf(variant_dir + "/f32", dir);
  for (const std::string& path : {variant_dir + "/f32", gguf}) {
    auto model = Model::load(path);
    ASSERT_EQ(model->config().rope.type, RopeType::LongRope) << path;
    EXPECT_NEAR(model->config().rope.attention_factor, std::sqrt(2.0f), 1e-6f) << path;
    const int64_t vocab = model->config().vocab;
    ASSERT_EQ(want.size(), static_cast<size_t>(n_short * vocab));
    ThreadPool pool(2);
    Decoder decoder(*model, pool);
    KVCache cache(model->config(), n_short);
    std::vector<float> got(want.size());
    decoder.forward(short_tokens.data(), n_short, cache, n_short, got.data());
    expect_logits_match(got, want, want_argmax, n_short, vocab, path);
    GenerateOptions options;
    options.max_new_tokens = static_cast<int64_t>(want_cached.size());
    options.stop_at_eos = false;
    EXPECT_EQ(generate(decoder, prompt, options).tokens, want_cached) << path;
  }
  const auto info = test::run_cli({"info", "--model", gguf});
  ASSERT_EQ(info.exit_code, 0) << info.err;
  EXPECT_NE(info.out.find("rope         longrope, theta 10000, rotary dim 8 (long factors past 16 positions, attention "
                          "factor 1.4142)"),
            std::string::npos)
      << info.out;
  // A file with one of the two factor tensors is refused by name, not run with half a RoPE.
  const auto half = info_without(gguf, "rope_factors_short.weight", 13, dir);
  EXPECT_NE(half.exit_code, 0);
  EXPECT_NE(half.err.find("rope_factors_long.weight and rope_factors_short.weight come together"), std::string::npos)
      << half.err;
}

TEST(ParityVariants, ShardedCheckpoint) {
  check_parity(models_dir() + "/llama-sharded", "llama", "f32");
}

// The same weights with config.json in the other transformers spelling (4.x rope_theta /
// rope_scaling instead of 5.x rope_parameters).
class ParityOtherSpelling : public ::testing::TestWithParam<std::string> {};

TEST_P(ParityOtherSpelling, MatchesTransformers) {
  const std::string variant = GetParam();
  test::TempDir dir;
  const std::string src = models_dir() + "/" + variant;
  const std::string alt = test::read_file(src + "/config_v4.json");
  ASSERT_EQ(alt.find("rope_parameters"), std::string::npos);
  ASSERT_NE(test::read_file(src + "/f32/config.json").find("rope_parameters"), std::string::npos);
  test::write_file(dir.file("config.json"), alt);
  test::copy_file(src + "/f32/model.safetensors", dir.file("model.safetensors"));
  check_parity(dir.path(), variant, "f32");
}

INSTANTIATE_TEST_SUITE_P(Fixtures, ParityOtherSpelling,
                         ::testing::Values("llama", "llama3rope", "mistral", "qwen2", "qwen3", "gemma2", "phi3",
                                           "phi3longrope", "qwen2yarn"));

}  // namespace
}  // namespace bioquant

namespace bioquant {
namespace {

// The shipped trained model (models/biomed-tiny): tokenizer ids, per-position argmax and the greedy
// continuation as HF transformers computed them (reference.json made at training time).
TEST(ParityVariants, ShippedBiomedTinyModel) {
  const std::string dir = test::fixtures_dir() + "/../../models/biomed-tiny";
  const json ref = json::parse(test::read_file(dir + "/reference.json"));
  auto tok = load_tokenizer(dir);
  const std::vector<int32_t> ids = tok->encode(ref["prompt"].get<std::string>(), true);
  ASSERT_EQ(ids, ref["token_ids"].get<std::vector<int32_t>>());
  auto model = Model::load(dir);
  ThreadPool pool(2);
  Decoder decoder(*model, pool);
  KVCache cache(model->config(), static_cast<int64_t>(ids.size()));
  const int64_t n = static_cast<int64_t>(ids.size()), vocab = model->config().vocab;
  std::vector<float> logits(static_cast<size_t>(n * vocab));
  decoder.forward(ids.data(), n, cache, n, logits.data());
  std::vector<int32_t> am;
  for (int64_t t = 0; t < n; ++t) am.push_back(top_token(logits.data() + t * vocab, vocab));
  EXPECT_EQ(am, ref["argmax_per_position"].get<std::vector<int32_t>>());
  GenerateOptions options;
  options.max_new_tokens = static_cast<int64_t>(ref["greedy_ids"].size());
  options.stop_at_eos = false;
  EXPECT_EQ(generate(decoder, ids, options).tokens, ref["greedy_ids"].get<std::vector<int32_t>>());
}

}  // namespace
}  // namespace bioquant
