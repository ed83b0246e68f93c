// Quantization of whole models: GGUF files written by `quantize` reload with exactly the logits
// of quantizing on load; the plan honours the policy and reports fallbacks; weight bytes are honest.
#include <gtest/gtest.h>

#include <map>
#include <random>
#include <tuple>
#include <nlohmann/json.hpp>

#include "bioquant/core/error.h"
#include "bioquant/core/half.h"
#include "bioquant/io/gguf.h"
#include "bioquant/kernels/cuda/gpu_decoder.h"
#include "bioquant/model/model.h"
#include "bioquant/model/quantize.h"
#include "bioquant/model/decoder.h"
#include "bioquant/model/synthetic.h"
#include "bioquant/quant/random_rows.h"
#include "test_util.h"

namespace bioquant {
namespace {

using nlohmann::json;

std::string fixture_tokens() {
  const json ref = json::parse(test::read_file(test::fixtures_dir() + "/models/llama/reference.json"));
  std::string s;
  for (const auto& t : ref["tokens"]) {
    if (!s.empty()) s.push_back(',');
    s.append(std::to_string(t.get<int>()));
  }
  return s;
}

class GgufRoundTrip : public ::testing::TestWithParam<std::tuple<std::string, std::string>> {};

TEST_P(GgufRoundTrip, ReloadsWithTheLogitsOfQuantizeOnLoad) {
  const auto& [variant, type] = GetParam();
  test::TempDir dir;
  const std::string model = test::fixtures_dir() + "/models/" + variant + "/f32";
  const std::string out = dir.file("m.gguf");
  std::vector<std::string> q = {"quantize", "--model", model, "--type", type, "--out", out};
  if (type == "nf4") q.push_back("--double-quant");
  const auto w = test::run_cli(q);
  ASSERT_EQ(w.exit_code, 0) << w.err;
  const std::string tokens = fixture_tokens();
  const auto from_file = test::run_cli({"logits", "--model", out, "--tokens", tokens, "--last", "3"});
  std::vector<std::string> on_load = {"logits", "--model", model, "--tokens", tokens, "--last", "3", "--quant", type};
  if (type == "nf4") on_load.push_back("--double-quant");
  const auto direct = test::run_cli(on_load);
  ASSERT_EQ(from_file.exit_code, 0) << from_file.err;
  ASSERT_EQ(direct.exit_code, 0) << direct.err;
  EXPECT_EQ(from_file.out, direct.out);  // bit-identical logits
  if (type == "f32") {  // and the f32 file still matches HF transformers
    const json got = json::parse(from_file.out);
    const json ref = json::parse(test::read_file(test::fixtures_dir() + "/models/" + variant + "/reference.json"));
    EXPECT_EQ(got["argmax"], ref["f32"]["argmax"]);
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, GgufRoundTrip,
                         ::testing::Combine(::testing::Values("llama", "llama3rope", "mistral", "qwen2", "qwen3", "gemma2", "phi3",
                                                              "phi3longrope", "qwen2yarn"),
                                            ::testing::Values("f32", "q8_0", "q4_k_m", "int8", "nf4")),
                         [](const auto& info) { return std::get<0>(info.param) + "_" + std::get<1>(info.param); });

TEST(QuantPlan, PolicyAndFallbacks) {
  ThreadPool pool(1);
  const ModelConfig c = synthetic_config("tiny");  // hidden 128: rows of 128 do not fill 256-blocks
  auto model = make_synthetic_model(c, DType::BF16, 1, pool);
  const auto nf4 = plan_quantization(*model, parse_quant_recipe("nf4"));
  for (const TensorPlan& p : nf4) {
    if (p.name == "embedding" || p.name == "output") {
      EXPECT_EQ(p.to, QuantType::BF16) << p.name;  // bitsandbytes leaves them alone
    } else {
      EXPECT_EQ(p.to, QuantType::NF4) << p.name;
    }
  }
  const auto q4k = plan_quantization(*model, parse_quant_recipe("q4_k"));
  for (const TensorPlan& p : q4k) {
    if (p.cols == 256) {  // ffn_down rows (ffn 256) fill the blocks
      EXPECT_EQ(p.to, QuantType::Q4_K) << p.name;
      EXPECT_TRUE(p.note.empty());
      continue;
    }
    EXPECT_EQ(p.to, p.name == "output" ? QuantType::Q8_0 : QuantType::Q4_0) << p.name;  // fallbacks
    EXPECT_FALSE(p.note.empty());
  }
  const auto all = plan_quantization(*model, parse_quant_recipe("nf4", true, "all"));
  for (const TensorPlan& p : all) EXPECT_EQ(p.to, QuantType::NF4) << p.name;
  EXPECT_THROW(parse_quant_recipe("q3_k"), Error);
  EXPECT_THROW(parse_quant_recipe("q8_0", true), Error);
}

// A checkpoint stored quantized, given --quant: every matrix quantized again is counted in one warning.
TEST(QuantPlan, QuantizingAQuantizedModelAgainIsSaidOnce) {
  ThreadPool pool(1);
  auto model = make_synthetic_model(synthetic_config("tiny"), DType::BF16, 1, pool);
  EXPECT_EQ(requantization_note(plan_quantization(*model, parse_quant_recipe("nf4"))), "");  // from bf16
  quantize_model(*model, plan_quantization(*model, parse_quant_recipe("q8_0")), pool);
  const auto again = plan_quantization(*model, parse_quant_recipe("nf4"));
  size_t changed = 0;
  for (const TensorPlan& p : again) changed += p.to != p.from ? 1 : 0;
  ASSERT_GT(changed, 0u);
  EXPECT_EQ(requantization_note(again),
            std::to_string(changed) + " of " + std::to_string(again.size()) +
                " matrices are stored quantized already (q8_0); they are quantized again from their dequantized "
                "values: two roundings, not what quantizing the original 16-bit weights gives");
  EXPECT_EQ(requantization_note(plan_quantization(*model, parse_quant_recipe("q8_0"))), "");  // nothing changes

  // On the command line: a warning on stderr, the run goes on.
  test::TempDir dir;
  const std::string gguf = dir.file("q8.gguf");
  ASSERT_EQ(test::run_cli({"quantize", "--model", test::fixtures_dir() + "/models/llama/f32", "--type", "q8_0", "--out",
                           gguf})
                .exit_code,
            0);
  const auto r = test::run_cli({"logits", "--model", gguf, "--tokens", "1,2", "--quant", "int8"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("warning: "), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("stored quantized already (q8_0)"), std::string::npos) << r.err;
  const auto plain = test::run_cli({"logits", "--model", gguf, "--tokens", "1,2"});
  EXPECT_EQ(plain.err.find("warning: "), std::string::npos) << plain.err;
}

// quantize_model reports the weights it has quantized: 0 first, then after each matrix that changes.
TEST(QuantPlan, QuantizingReportsItsProgressByWeights) {
  ThreadPool pool(1);
  auto model = make_synthetic_model(synthetic_config("tiny"), DType::BF16, 1, pool);
  const auto plan = plan_quantization(*model, parse_quant_recipe("nf4"));  // embedding and output stay bf16
  int64_t expected_total = 0;
  size_t changing = 0;
  for (const TensorPlan& p : plan)
    if (p.to != QuantType::BF16) {
      expected_total += p.rows * p.cols;
      ++changing;
    }
  std::vector<std::pair<int64_t, int64_t>> calls;
  quantize_model(*model, plan, pool, [&](int64_t done, int64_t total) { calls.emplace_back(done, total); });
  ASSERT_EQ(calls.size(), changing + 1);
  EXPECT_EQ(calls.front(), std::make_pair(int64_t{0}, expected_total));
  EXPECT_EQ(calls.back(), std::make_pair(expected_total, expected_total));
  for (size_t i = 1; i < calls.size(); ++i) EXPECT_GT(calls[i].first, calls[i - 1].first);
  // Nothing left to change: no calls at all.
  calls.clear();
  quantize_model(*model, plan_quantization(*model, parse_quant_recipe("nf4")), pool,
                 [&](int64_t done, int64_t total) { calls.emplace_back(done, total); });
  EXPECT_TRUE(calls.empty());
}

TEST(QuantPlan, Q4KMMixFollowsLlamaCpp) {
  ThreadPool pool(1);
  ModelConfig c = synthetic_config("tiny");
  c.hidden = 256;
  c.head_dim = 64;
  c.intermediate = 512;
  c.n_layers = 16;
  c.layer_sliding.assign(16, false);
  auto model = make_synthetic_model(c, DType::BF16, 1, pool);
  const auto plan = plan_quantization(*model, parse_quant_recipe("q4_k_m"));
  // use_more_bits: layers < 2, >= 14, and (i - 2) % 3 == 2 -> 4, 7, 10, 13.
  const std::vector<int> more = {0, 1, 4, 7, 10, 13, 14, 15};
  for (const TensorPlan& p : plan) {
    if (p.name == "output") {
      EXPECT_EQ(p.to, QuantType::Q6_K);
      continue;
    }
    if (p.name == "embedding") {
      EXPECT_EQ(p.to, QuantType::Q4_K);
      continue;
    }
    const int layer = std::stoi(p.name.substr(7));
    const bool bumped = (p.name.find("attn_v") != std::string::npos || p.name.find("ffn_down") != std::string::npos) &&
                        std::find(more.begin(), more.end(), layer) != more.end();
    EXPECT_EQ(p.to, bumped ? QuantType::Q6_K : QuantType::Q4_K) << p.name;
  }
}

}  // namespace
}  // namespace bioquant

namespace bioquant {
namespace {

// The bits per weight formats.md gives (q4_k_m aside), against what the model actually holds.
TEST(QuantMemory, WeightBytesMatchBitsPerWeight) {
  ThreadPool pool(2);
  ModelConfig c = synthetic_config("tiny");
  c.hidden = 2048;
  c.head_dim = 64;
  c.n_heads = 32;
  c.n_kv_heads = 8;
  c.intermediate = 5632;
  c.n_layers = 1;
  c.vocab = 1024;
  c.layer_sliding.assign(1, false);
  const struct {
    const char* name;
    bool dq;
    double bpw;
  } formats[] = {{"bf16", false, 16.0},  {"q8_0", false, 8.5}, {"q4_0", false, 4.5}, {"q4_k", false, 4.5},
                 {"q5_k", false, 5.5},   {"q6_k", false, 6.5625}, {"int8", false, 8.0}, {"nf4", false, 4.5},
                 {"fp4", false, 4.5},    {"nf4", true, 4.127}};
  for (const auto& f : formats) {
    const QuantRecipe r = parse_quant_recipe(f.name, f.dq, "all");
    auto model = make_synthetic_model(c, DType::BF16, 3, pool, &r);
    double params = 0, bytes = 0;
    for (const auto& [name, m] : model->named_matrices()) {
      params += static_cast<double>(m->rows * m->cols);
      bytes += static_cast<double>(m->nbytes());
      EXPECT_EQ(std::string(m->type_name()), f.name) << name;
    }
    const double expected = params * f.bpw / 8.0;
    EXPECT_NEAR(bytes / expected, 1.0, 0.01) << f.name << (f.dq ? "+dq" : "") << ": " << 8.0 * bytes / params << " bits/weight";
  }
}

// Synthetic weights made straight in a format (random_rows.h) must look like the float synthetic
// weights once dequantized (std ~0.02, centred), be a function of (seed, row) only, and differ by row.
TEST(SyntheticWeights, RandomRowsDequantizeToWeightLikeValues) {
  struct Case {
    QuantType t;
    bool dq;
  };
  const Case cases[] = {{QuantType::F32, false},  {QuantType::F16, false},  {QuantType::BF16, false},
                        {QuantType::Q8_0, false}, {QuantType::Q4_0, false}, {QuantType::Q4_K, false},
                        {QuantType::Q5_K, false}, {QuantType::Q6_K, false}, {QuantType::INT8, false},
                        {QuantType::NF4, false},  {QuantType::FP4, false},  {QuantType::NF4, true},
                        {QuantType::FP4, true}};
  // Its fp16 conversion is the reference one, subnormals included.
  for (float v = 1e-9f; v < 7e4f; v *= 1.0137f) {
    EXPECT_EQ(random_rows::f16_bits(v), f32_to_f16(v)) << v;
    EXPECT_EQ(random_rows::f16_bits(-v), f32_to_f16(-v)) << v;
  }
  const int64_t cols = 1024;
  for (const Case& k : cases) {
    const char* name = quant_traits(k.t).name;
    const size_t rb = quant_row_bytes(k.t, cols, k.dq);
    std::vector<uint8_t> r0(rb), r0again(rb), r1(rb);
    random_rows::make_row(k.t, k.dq, cols, 99, 0, r0.data());
    random_rows::make_row(k.t, k.dq, cols, 99, 0, r0again.data());
    random_rows::make_row(k.t, k.dq, cols, 99, 1, r1.data());
    EXPECT_EQ(r0, r0again) << name;
    EXPECT_NE(r0, r1) << name;
    double sum = 0, sq = 0;
    std::vector<float> w(static_cast<size_t>(cols));
    for (const auto* row : {&r0, &r1}) {
      dequantize_row(k.t, row->data(), cols, w.data(), k.dq);
      for (float v : w) {
        ASSERT_TRUE(std::isfinite(v)) << name;
        sum += v;
        sq += static_cast<double>(v) * v;
      }
    }
    const double n = 2.0 * cols, mean = sum / n, sd = std::sqrt(sq / n - mean * mean);
    EXPECT_LT(std::fabs(mean), 0.01) << name << (k.dq ? "+dq" : "");
    EXPECT_GT(sd, 0.008) << name << (k.dq ? "+dq" : "");
    EXPECT_LT(sd, 0.04) << name << (k.dq ? "+dq" : "");
  }
}

// A synthetic model made straight in q4_k_m has the plan's formats and runs; one whose matrices are
// left for the GPU to make is refused by the CPU engine with a clear error.
TEST(SyntheticWeights, RandomRowModelsRunAndGpuOnlyOnesAreRefusedOnTheCpu) {
  ThreadPool pool(2);
  ModelConfig c = synthetic_config("tiny");
  c.hidden = 256;
  c.intermediate = 512;
  c.head_dim = 64;
  const QuantRecipe recipe = parse_quant_recipe("q4_k_m");
  auto model = make_synthetic_model(c, DType::BF16, 5, pool, &recipe, SyntheticWeights::RandomRows);
  const auto plan = plan_quantization(*make_synthetic_model(c, DType::BF16, 5, pool), recipe);
  const auto matrices = model->named_matrices();
  ASSERT_EQ(matrices.size(), plan.size());
  for (size_t i = 0; i < plan.size(); ++i) EXPECT_EQ(matrices[i].second->type, plan[i].to) << plan[i].name;
  Decoder decoder(*model, pool);
  KVCache cache(c, 4);
  const int32_t ids[] = {3, 1, 4};
  std::vector<float> logits(static_cast<size_t>(c.vocab));
  decoder.forward(ids, 3, cache, 1, logits.data());
  float amax = 0.0f;
  for (float v : logits) {
    ASSERT_TRUE(std::isfinite(v));
    amax = std::max(amax, std::fabs(v));
  }
  EXPECT_GT(amax, 0.0f);
  auto gpu_only = make_synthetic_model(c, DType::BF16, 5, pool, &recipe, SyntheticWeights::RandomRowsOnGpu);
  EXPECT_NE(gpu_only->weights().embed.data, nullptr);  // embedding rows are looked up on the host
  EXPECT_EQ(gpu_only->weights().layers[0].wq.data, nullptr);
  EXPECT_THROW(Decoder(*gpu_only, pool), Error);
}

// The study's other families as synthetic shapes: each has its checkpoint's parameter count (as Hugging Face
// counts them for mistralai/Mistral-7B-v0.3, Qwen/Qwen3-8B, google/gemma-2-9b, microsoft/Phi-3-mini-4k-instruct,
// microsoft/phi-4) and its family's traits; shrunk to a small width, each builds the family's tensors
// (fused q/k/v and gate/up, sandwich norms, q/k norms) and runs, in floats and in q4_k.
TEST(SyntheticWeights, StudyFamiliesHaveTheirCheckpointsShapes) {
  const struct {
    const char* name;
    const char* model_type;
    int64_t parameters;
  } families[] = {{"mistral-7b", "mistral", 7248023552}, {"qwen3-8b", "qwen3", 8190735360},
                  {"gemma2-9b", "gemma2", 9241705984}, {"phi3-mini", "phi3", 3821079552},
                  {"phi4-14b", "phi3", 14659507200}};
  ThreadPool pool(2);
  for (const auto& f : families) {
    ModelConfig c = synthetic_config(f.name);
    EXPECT_EQ(c.model_type, f.model_type) << f.name;
    EXPECT_EQ(c.parameter_count(), f.parameters) << f.name;
    if (c.model_type == "gemma2") {
      EXPECT_EQ(c.head_dim, 256);
      EXPECT_FLOAT_EQ(c.attn_softcap, 50.0f);
      EXPECT_FLOAT_EQ(c.final_softcap, 30.0f);
      EXPECT_FLOAT_EQ(c.query_scale, 1.0f / 16.0f);
      EXPECT_TRUE(c.tie_embeddings && c.sandwich_norms && c.norm_unit_offset);
      ASSERT_EQ(c.layer_sliding.size(), 42u);
      EXPECT_TRUE(c.layer_sliding[0] && !c.layer_sliding[1] && c.layer_sliding[40] && !c.layer_sliding[41]);
    }
    EXPECT_EQ(c.fused_qkv && c.fused_gate_up, c.model_type == "phi3") << f.name;
    EXPECT_EQ(c.qk_norm, c.model_type == "qwen3") << f.name;

    const int64_t group = c.n_heads / c.n_kv_heads;
    c.hidden = 256;
    c.intermediate = 512;
    c.n_heads = 4;
    c.n_kv_heads = 4 / std::min<int64_t>(group, 4);
    c.head_dim = 64;
    c.vocab = 512;
    c.n_layers = 2;
    c.layer_sliding.resize(2);
    if (c.sliding_window > 0) c.sliding_window = 3;  // so the sliding layers' window is crossed below
    const QuantRecipe recipe = parse_quant_recipe("q4_k");
    // Floats; floats quantized to q4_k as they are made; q4_k rows made straight (a tied output follows the
    // embedding in the last two).
    for (int mode = 0; mode < 3; ++mode) {
      const SyntheticWeights how = mode == 2 ? SyntheticWeights::RandomRows : SyntheticWeights::Quantized;
      auto model = make_synthetic_model(c, DType::F32, 7, pool, mode > 0 ? &recipe : nullptr, how);
      if (c.tie_embeddings) {
        EXPECT_EQ(model->weights().output.data, model->weights().embed.data) << f.name;
        EXPECT_EQ(model->weights().output.type, model->weights().embed.type) << f.name;
      }
      const LayerWeights& l = model->weights().layers[1];
      EXPECT_EQ(l.wq.rows, 256);
      EXPECT_EQ(l.wk.rows, 64 * c.n_kv_heads);
      EXPECT_EQ(l.w_up.rows, 512);
      EXPECT_EQ(l.ffn_post_norm.size(), c.sandwich_norms ? 256u : 0u) << f.name;
      EXPECT_EQ(l.k_norm.size(), c.qk_norm ? 64u : 0u) << f.name;
      Decoder decoder(*model, pool);
      KVCache cache(c, 8);
      const int32_t ids[] = {3, 1, 4, 1, 5, 9};
      std::vector<float> logits(static_cast<size_t>(6 * c.vocab));
      decoder.forward(ids, 6, cache, 6, logits.data());
      float amax = 0.0f;
      for (float v : logits) {
        ASSERT_TRUE(std::isfinite(v)) << f.name;
        amax = std::max(amax, std::fabs(v));
      }
      EXPECT_GT(amax, 0.0f) << f.name;
      if (c.final_softcap > 0.0f) {
        EXPECT_LT(amax, c.final_softcap) << f.name;
      }
    }
  }
}

// Peak resident memory of a whole run, measured by the process itself (bench reports VmHWM).
TEST(QuantMemory, Nf4PeakRssOfA1BModelIsAThirdOfBf16) {
  SKIP_WHERE_RSS_IS_SANITIZED();
  auto run = [](std::vector<std::string> extra) {
    std::vector<std::string> args = {"bench", "--synthetic", "llama-1b", "-p", "8", "-n", "2", "-r", "1", "--no-bandwidth", "--json"};
    args.insert(args.end(), extra.begin(), extra.end());
    const auto r = test::run_cli(args);
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return nlohmann::json::parse(r.out);
  };
  const auto bf16 = run({});
  const auto nf4 = run({"--quant", "nf4", "--quant-policy", "all"});
  const double ratio = nf4["peak_rss_bytes"].get<double>() / bf16["peak_rss_bytes"].get<double>();
  RecordProperty("nf4_over_bf16_peak_rss", std::to_string(ratio));
  EXPECT_LE(ratio, 0.35) << "nf4 " << nf4["peak_rss_bytes"] << " vs bf16 " << bf16["peak_rss_bytes"];
}

}  // namespace
}  // namespace bioquant

namespace bioquant {
namespace {

// Fidelity on a real trained model (models/biomed-tiny: every matrix dimension a multiple of 256)
// over biomedical abstracts: KL divergence against the unquantized model orders the formats.
TEST(QuantFidelity, KlDivergenceOrdersTheFormats) {
  if (test::shared_dir().empty()) GTEST_SKIP() << "../shared not present";
  test::TempDir dir;
  std::string text;
  const std::string hoc = test::read_file(test::shared_dir() + "/bionlp/HoC/sample200.tsv");
  size_t pos = hoc.find('\n') + 1;
  for (int i = 0; i < 60 && pos < hoc.size(); ++i) {
    size_t nl = hoc.find('\n', pos);
    if (nl == std::string::npos) nl = hoc.size();
    const std::string line = hoc.substr(pos, nl - pos);
    pos = nl + 1;
    const size_t a = line.find('\t'), b = line.find('\t', a + 1);
    if (a != std::string::npos && b != std::string::npos) text += line.substr(a + 1, b - a - 1) + "\n\n";
  }
  test::write_file(dir.file("abstracts.txt"), text);
  const std::string model = test::fixtures_dir() + "/../../models/biomed-tiny";
  std::map<std::string, nlohmann::json> r;
  for (const char* q : {"q8_0", "q6_k", "q5_k", "q4_k", "int8", "nf4"}) {
    const auto out = test::run_cli({"kld", "--base", model, "--quant", q, "--text", dir.file("abstracts.txt"),
                                    "--max-tokens", "2048", "--json"});
    ASSERT_EQ(out.exit_code, 0) << out.err;
    r[q] = nlohmann::json::parse(out.out);
    ASSERT_GE(r[q]["positions"].get<int>(), 2000);
  }
  auto kld = [&](const char* q) { return r[q]["kld_mean"].get<double>(); };
  EXPECT_LT(kld("q8_0"), kld("q6_k"));
  EXPECT_LT(kld("q6_k"), kld("q5_k"));
  EXPECT_LT(kld("q5_k"), kld("q4_k"));
  EXPECT_LT(kld("int8"), kld("nf4"));
  EXPECT_GE(r["q8_0"]["same_top_rate"].get<double>(), 0.95);
  EXPECT_GE(r["int8"]["same_top_rate"].get<double>(), 0.95);
  for (auto& [q, j] : r) RecordProperty("kld_" + q, std::to_string(j["kld_mean"].get<double>()));
  // --device cuda: both models on the GPU (prompt chunks on tensor cores there, so not the CPU's
  // numbers, but the same ordering of magnitude); without a GPU, a one-line error.
  const auto gpu = test::run_cli({"kld", "--base", model, "--quant", "q4_k", "--text", dir.file("abstracts.txt"),
                                  "--max-tokens", "2048", "--json", "--device", "cuda"});
  if (cuda_device_count() == 0) {
    EXPECT_NE(gpu.exit_code, 0);
    EXPECT_NE(gpu.err.find("device 'cuda' is not available"), std::string::npos) << gpu.err;
    return;
  }
  ASSERT_EQ(gpu.exit_code, 0) << gpu.err;
  const nlohmann::json g = nlohmann::json::parse(gpu.out);
  EXPECT_EQ(g["device"], "cuda");
  EXPECT_EQ(g["positions"], r["q4_k"]["positions"]);
  EXPECT_GT(g["kld_mean"].get<double>(), 0.0);
  EXPECT_LT(g["kld_mean"].get<double>(), 4.0 * kld("q4_k") + 0.01);
  EXPECT_GE(g["same_top_rate"].get<double>(), 0.8);
}

// A GGUF file with llama.cpp's q3_k and q5_0 matrices (as in its Q3_K_* files, and Q4_K_M files of
// models whose rows do not fill 256-blocks) loads with them held as q6_k and q8_0, says so, and holds
// exactly the values of the same file stored in f32; it runs as that file does within the integer
// kernels' bound.
TEST(GgufWidening, Q3kAndQ5_0MatricesHoldTheFileValues) {
  const int64_t hidden = 256, ff = 512, vocab = 64, kvd = 128;
  std::mt19937 rng(11);
  const auto uniform = [&](float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng); };
  struct Spec {
    std::string name;
    int64_t rows, cols;
    std::string format;  // "" = f32
  };
  const std::vector<Spec> specs = {
      {"token_embd.weight", vocab, hidden, ""},    {"output.weight", vocab, hidden, ""},
      {"output_norm.weight", 1, hidden, ""},       {"blk.0.attn_norm.weight", 1, hidden, ""},
      {"blk.0.ffn_norm.weight", 1, hidden, ""},    {"blk.0.attn_q.weight", hidden, hidden, "q3_k"},
      {"blk.0.attn_k.weight", kvd, hidden, "q3_k"}, {"blk.0.attn_v.weight", kvd, hidden, "q5_0"},
      {"blk.0.attn_output.weight", hidden, hidden, "q3_k"}, {"blk.0.ffn_gate.weight", ff, hidden, "q3_k"},
      {"blk.0.ffn_up.weight", ff, hidden, "q5_0"}, {"blk.0.ffn_down.weight", hidden, ff, "q5_0"}};
  std::vector<std::vector<uint8_t>> quantized, plain;
  for (const Spec& sp : specs) {
    std::vector<float> values;
    std::vector<uint8_t> bytes;
    if (sp.format.empty()) {
      for (int64_t i = 0; i < sp.rows * sp.cols; ++i) values.push_back(sp.rows == 1 ? uniform(0.8f, 1.2f) : uniform(-0.5f, 0.5f));
    } else {
      const bool k = sp.format == "q3_k";
      const int64_t block = k ? 256 : 32;
      for (int64_t b = 0; b < sp.rows * sp.cols / block; ++b) {
        uint8_t levels[256], scales[16];
        for (int64_t j = 0; j < block; ++j) levels[j] = static_cast<uint8_t>(rng() % (k ? 8 : 32));
        for (uint8_t& x : scales) x = static_cast<uint8_t>(rng() % 64);
        const uint16_t d = f32_to_f16(k ? uniform(0.0005f, 0.002f) : uniform(0.002f, 0.006f));
        const auto blk = k ? test::pack_q3_k_block(levels, scales, d) : test::pack_q5_0_block(levels, d);
        bytes.insert(bytes.end(), blk.begin(), blk.end());
      }
      values.resize(static_cast<size_t>(sp.rows * sp.cols));
      const size_t row_bytes = bytes.size() / static_cast<size_t>(sp.rows);
      for (int64_t r = 0; r < sp.rows; ++r)
        dequantize_ggml_row(sp.format, bytes.data() + r * row_bytes, sp.cols, values.data() + r * sp.cols);
    }
    std::vector<uint8_t> f32(values.size() * sizeof(float));
    std::memcpy(f32.data(), values.data(), f32.size());
    plain.push_back(f32);
    quantized.push_back(sp.format.empty() ? f32 : bytes);
  }
  const auto u32 = [](int64_t v) { return GgufWriteValue{GgufValueType::U32, GgufValueType::U8, v}; };
  const std::vector<std::pair<std::string, GgufWriteValue>> metadata = {
      {"general.architecture", {GgufValueType::STRING, GgufValueType::U8, "llama"}},
      {"llama.embedding_length", u32(hidden)},
      {"llama.feed_forward_length", u32(ff)},
      {"llama.block_count", u32(1)},
      {"llama.attention.head_count", u32(4)},
      {"llama.attention.head_count_kv", u32(2)},
      {"llama.context_length", u32(64)}};
  test::TempDir dir;
  for (const bool as_f32 : {false, true}) {
    std::vector<GgufWriteTensor> tensors;
    for (size_t i = 0; i < specs.size(); ++i) {
      const Spec& sp = specs[i];
      const auto& bytes = as_f32 ? plain[i] : quantized[i];
      const uint32_t type = as_f32 || sp.format.empty() ? 0 : sp.format == "q3_k" ? 11 : 6;
      std::vector<uint64_t> dims = {static_cast<uint64_t>(sp.cols)};
      if (sp.rows > 1) dims.push_back(static_cast<uint64_t>(sp.rows));
      tensors.push_back({sp.name, dims, type, bytes.data(), bytes.size()});
    }
    write_gguf(dir.file(as_f32 ? "f32.gguf" : "q.gguf"), metadata, tensors);
  }
  auto held = Model::load(dir.file("q.gguf"));
  auto reference = Model::load(dir.file("f32.gguf"));
  EXPECT_EQ(held->load_notes(),
            (std::vector<std::string>{"4 q3_k matrices are held as q6_k: the same weights, bit for bit, at 6.56 bits per "
                                      "weight instead of 3.44 (BioQuant has no q3_k kernels)",
                                      "3 q5_0 matrices are held as q8_0: the same weights, bit for bit, at 8.50 bits per "
                                      "weight instead of 5.50 (BioQuant has no q5_0 kernels)"}));
  EXPECT_TRUE(reference->load_notes().empty());
  const LayerWeights& l = held->weights().layers[0];
  EXPECT_EQ(l.wq.type, QuantType::Q6_K);
  EXPECT_EQ(l.wv.type, QuantType::Q8_0);
  EXPECT_EQ(l.w_down.type, QuantType::Q8_0);
  const auto a = held->named_matrices();
  const auto b = reference->named_matrices();
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    const Matrix& m = *a[i].second;
    std::vector<float> x(static_cast<size_t>(m.cols)), y(x.size());
    for (int64_t r = 0; r < m.rows; ++r) {
      m.row_to_f32(r, x.data());
      b[i].second->row_to_f32(r, y.data());
      ASSERT_EQ(std::memcmp(x.data(), y.data(), x.size() * sizeof(float)), 0) << a[i].first << " row " << r;
    }
  }
  std::vector<int32_t> tokens;
  for (int i = 0; i < 12; ++i) tokens.push_back((i * 17 + 3) % static_cast<int32_t>(vocab));
  ThreadPool pool(2);
  Decoder da(*held, pool), db(*reference, pool);
  KVCache ca(held->config(), 12), cb(reference->config(), 12);
  std::vector<float> la(static_cast<size_t>(12 * vocab)), lb(la.size());
  da.forward(tokens.data(), 12, ca, 12, la.data());
  db.forward(tokens.data(), 12, cb, 12, lb.data());
  float max_ref = 0.0f, max_err = 0.0f;
  for (size_t i = 0; i < la.size(); ++i) {
    max_ref = std::max(max_ref, std::fabs(lb[i]));
    max_err = std::max(max_err, std::fabs(la[i] - lb[i]));
  }
  EXPECT_LE(max_err, 5e-2f * std::max(1.0f, max_ref));
  EXPECT_GT(max_ref, 0.1f);  // logits that say something
  const auto info = test::run_cli({"info", "--model", dir.file("q.gguf")});
  ASSERT_EQ(info.exit_code, 0) << info.err;
  EXPECT_NE(info.err.find("note: 4 q3_k matrices are held as q6_k"), std::string::npos) << info.err;

  // Formats without kernels or an exact wider form are refused by name.
  for (const auto& [type, name, block_bytes] : {std::tuple<uint32_t, std::string, size_t>{10, "q2_k", 84},
                                                {23, "iq4_xs", 136}, {3, "q4_1", 20}}) {
    std::vector<GgufWriteTensor> tensors;
    const std::vector<uint8_t> zeros(static_cast<size_t>(hidden * hidden / (type == 3 ? 32 : 256)) * block_bytes, 0);
    for (size_t i = 0; i < specs.size(); ++i) {
      const Spec& sp = specs[i];
      std::vector<uint64_t> dims = {static_cast<uint64_t>(sp.cols)};
      if (sp.rows > 1) dims.push_back(static_cast<uint64_t>(sp.rows));
      if (sp.name == "blk.0.attn_q.weight") tensors.push_back({sp.name, dims, type, zeros.data(), zeros.size()});
      else tensors.push_back({sp.name, dims, 0, plain[i].data(), plain[i].size()});
    }
    write_gguf(dir.file(name + ".gguf"), metadata, tensors);
    EXPECT_NE(test::error_of([&] { Model::load(dir.file(name + ".gguf")); })
                  .find("tensor 'model.layers.0.self_attn.q_proj.weight' has unsupported format '" + name + "'"),
              std::string::npos)
        << name;
  }
}

}  // namespace
}  // namespace bioquant
