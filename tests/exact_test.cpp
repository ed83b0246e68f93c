// Exact numerics (kernels/exact.h) on the CPU: its elementary functions against libm, and its
// forward pass independent of how the work is split (prompt chunks, batches, threads) and close to
// the default engine. The GPU's bit-for-bit agreement is GpuParity.ExactNumericsAreBitIdenticalToTheCpuEngine.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "bioquant/core/error.h"
#include "bioquant/core/thread_pool.h"
#include "bioquant/kernels/exact.h"
#include "bioquant/model/decoder.h"
#include "bioquant/model/model.h"
#include "bioquant/model/quantize.h"
#include "test_util.h"

namespace bioquant {
namespace {

using json = nlohmann::json;

// Distance in float ulps between a float and the double it approximates.
double ulps(float got, double want) {
  const float w = static_cast<float>(want);
  const double ulp = std::fabs(static_cast<double>(std::nextafter(w, INFINITY)) - static_cast<double>(w));
  return std::fabs(static_cast<double>(got) - want) / (ulp > 0 ? ulp : 1e-45);
}

TEST(ExactMath, ElementaryFunctionsAreWithinAnUlpOfLibm) {
  double worst_exp = 0, worst_tanh = 0, worst_sin = 0, worst_cos = 0;
  for (int i = -20000; i <= 20000; ++i) {
    const float x = static_cast<float>(i) * 0.0043f;  // [-86, 86]
    worst_exp = std::max(worst_exp, ulps(exact::exp_f(x), std::exp(static_cast<double>(x))));
    const float y = static_cast<float>(i) * 0.00061f;  // [-12.2, 12.2]
    worst_tanh = std::max(worst_tanh, ulps(exact::tanh_f(y), std::tanh(static_cast<double>(y))));
    const float a = static_cast<float>(i) * 2.7183f;  // angles up to ~5.4e4 (RoPE: position * frequency)
    float s, c;
    exact::sin_cos(a, &s, &c);
    worst_sin = std::max(worst_sin, std::fabs(s - std::sin(static_cast<double>(a))) * 1.6777216e7);  // absolute, in 2^-24
    worst_cos = std::max(worst_cos, std::fabs(c - std::cos(static_cast<double>(a))) * 1.6777216e7);
  }
  EXPECT_LE(worst_exp, 0.5001);  // correctly rounded up to the double polynomial's error
  EXPECT_LE(worst_tanh, 1.0);
  EXPECT_LE(worst_sin, 1.0);
  EXPECT_LE(worst_cos, 1.0);
  EXPECT_EQ(exact::exp_f(0.0f), 1.0f);
  EXPECT_EQ(exact::exp_f(-200.0f), 0.0f);
  EXPECT_TRUE(std::isinf(exact::exp_f(200.0f)));
  EXPECT_EQ(exact::tanh_f(30.0f), 1.0f);
  EXPECT_EQ(exact::tanh_f(-30.0f), -1.0f);
  EXPECT_EQ(exact::tanh_f(0.0f), 0.0f);
  float s, c;
  exact::sin_cos(0.0f, &s, &c);
  EXPECT_EQ(s, 0.0f);
  EXPECT_EQ(c, 1.0f);
  // The canonical order (lane partials, then the lanes), not left to right: 31 ones then 2^24 in
  // term order would give 2^24 + 32; here 2^24 lands in lane 0, which comes first, and each 1 is lost.
  const float big = 16777216.0f;
  const auto term = [&](int64_t u) { return u == 32 ? big : (u >= 1 && u < 32 ? 1.0f : 0.0f); };
  EXPECT_EQ(exact::canonical_sum<float>(33, term), big);
  float left_to_right = 0.0f;
  for (int64_t u = 0; u < 33; ++u) left_to_right += term(u);
  EXPECT_EQ(left_to_right, big + 32.0f);
}

std::unique_ptr<Model> fixture(const std::string& variant, const std::string& format, ThreadPool& pool) {
  auto model = Model::load(test::fixtures_dir() + "/models/" + variant + "/f32");
  if (format != "f32") {
    const bool dq = format == "nf4+dq";
    const std::string f = dq ? "nf4" : format;
    quantize_model(*model, plan_quantization(*model, parse_quant_recipe(f, dq, "all")), pool);
  }
  return model;
}

std::vector<int32_t> fixture_tokens(const std::string& variant) {
  const json ref = json::parse(test::read_file(test::fixtures_dir() + "/models/" + variant + "/reference.json"));
  return ref["tokens"].get<std::vector<int32_t>>();
}

// The last position's logits after feeding `tokens` in pieces of `piece` tokens (0: all at once).
std::vector<float> last_logits(Decoder& d, const std::vector<int32_t>& tokens, int64_t piece) {
  const ModelConfig& c = d.model().config();
  KVCache cache(c, static_cast<int64_t>(tokens.size()));
  std::vector<float> out(static_cast<size_t>(c.vocab));
  const int64_t n = static_cast<int64_t>(tokens.size()), step = piece > 0 ? piece : n;
  for (int64_t i = 0; i < n; i += step) {
    const int64_t k = std::min(step, n - i);
    d.forward(tokens.data() + i, k, cache, i + k == n ? 1 : 0, i + k == n ? out.data() : nullptr);
  }
  return out;
}

TEST(ExactDecoder, LogitsDoNotDependOnPromptSplitBatchOrThreads) {
  ThreadPool one(1), three(3);
  for (const char* variant : {"llama", "qwen3", "gemma2", "phi3"}) {
    const std::vector<int32_t> tokens = fixture_tokens(variant);
    for (const char* format : {"f32", "bf16", "q4_k", "q6_k", "nf4+dq", "int8"}) {
      auto model = fixture(variant, format, one);
      Decoder a(*model, one, -1, KvType::F32, true), b(*model, three, -1, KvType::F32, true);
      const std::vector<float> whole = last_logits(a, tokens, 0);
      EXPECT_EQ(last_logits(a, tokens, 1), whole) << variant << " " << format << ": one token at a time";
      EXPECT_EQ(last_logits(b, tokens, 7), whole) << variant << " " << format << ": 3 threads, pieces of 7";
      // Batched with another sequence: the same logits.
      const ModelConfig& c = model->config();
      const std::vector<int32_t> other(tokens.begin() + 2, tokens.end());
      KVCache c1(c, 64), c2(c, 64);
      std::vector<float> l1(static_cast<size_t>(c.vocab)), l2(l1.size());
      const DecodeSegment segs[] = {{tokens.data(), static_cast<int64_t>(tokens.size()), &c1, 1, l1.data()},
                                    {other.data(), static_cast<int64_t>(other.size()), &c2, 1, l2.data()}};
      b.forward_batch(segs);
      EXPECT_EQ(l1, whole) << variant << " " << format << ": batched";
      EXPECT_EQ(l2, last_logits(a, other, 0)) << variant << " " << format << ": batched, second sequence";
    }
  }
}

// The same model as the default engine: logits within the default engine's own quantization noise.
TEST(ExactDecoder, AgreesWithTheDefaultEngine) {
  ThreadPool pool(2);
  for (const char* variant : {"llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "llama3rope"}) {
    const std::vector<int32_t> tokens = fixture_tokens(variant);
    const int64_t n = static_cast<int64_t>(tokens.size());
    for (const char* format : {"f32", "f16", "q8_0", "q4_0", "q5_k", "fp4"}) {
      auto model = fixture(variant, format, pool);
      const int64_t vocab = model->config().vocab;
      Decoder fast(*model, pool), exact(*model, pool, -1, KvType::F32, true);
      KVCache k1(model->config(), n), k2(model->config(), n);
      std::vector<float> a(static_cast<size_t>(n * vocab)), b(a.size());
      fast.forward(tokens.data(), n, k1, n, a.data());
      exact.forward(tokens.data(), n, k2, n, b.data());
      float err = 0, ref = 0;
      for (size_t i = 0; i < a.size(); ++i) {
        err = std::max(err, std::fabs(a[i] - b[i]));
        ref = std::max(ref, std::fabs(a[i]));
      }
      const bool plain = std::string(format) == "f32" || std::string(format) == "f16";
      EXPECT_LE(err, (plain ? 1e-4f : 5e-2f) * std::max(1.0f, ref)) << variant << " " << format;
      EXPECT_GT(err, 0.0f) << variant << " " << format << ": another summation order, not the same code";
      std::printf("%-10s %-5s max|exact - default| %.2e (max|logit| %.2f)\n", variant, format, err, ref);
    }
  }
}

TEST(ExactDecoder, RefusesWhatItCannotComputeExactly) {
  ThreadPool pool(1);
  auto model = Model::load(test::fixtures_dir() + "/models/llama/f32");
  QuantRecipe recipe = parse_quant_recipe("int8", false, "all");
  recipe.int8_threshold = 1e-3f;  // every feature an outlier
  quantize_model(*model, plan_quantization(*model, recipe), pool);
  Decoder d(*model, pool, -1, KvType::F32, true);
  KVCache cache(model->config(), 4);
  const int32_t t = 1;
  std::vector<float> out(static_cast<size_t>(model->config().vocab));
  EXPECT_THROW(d.forward(&t, 1, cache, 1, out.data()), Error);
}

}  // namespace
}  // namespace bioquant
