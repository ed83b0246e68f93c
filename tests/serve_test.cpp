// `bioquant serve` (issue 8): the batched decoder step, the scheduler, stop strings, request
// validation, the task endpoints, and the real server on loopback driven by a real HTTP client —
// every endpoint, SSE streaming, 401/400/404/405/413, deadlines, shutdown, log hygiene, a short
// fuzz run, non-loopback refusal, and `bioquant eval --backend openai` against `bioquant serve`
// giving exactly the in-process scores. The long load test and the 10,000-request fuzz run are
// bench/serve_load.cpp (never run as tests).
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <numeric>
#include <random>
#include <set>
#include <thread>

#include <httplib.h>
#include <nlohmann/json.hpp>

#include "bioquant/core/thread_pool.h"
#include "bioquant/engine/generator.h"
#include "bioquant/engine/sampler.h"
#include "bioquant/eval/backend.h"
#include "bioquant/eval/prompts.h"
#include "bioquant/model/decoder.h"
#include "bioquant/model/quantize.h"
#include "bioquant/serve/api.h"
#include "bioquant/serve/bionlp.h"
#include "bioquant/serve/scheduler.h"
#include "bioquant/serve/server.h"
#include "bioquant/serve/text_stream.h"
#include "bioquant/tokenizer/tokenizer.h"
#include "test_util.h"

namespace bioquant::serve {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

std::string demo_model() { return test::fixtures_dir() + "/../../models/biomed-tiny"; }
std::string data_dir() {
  const std::string shared = test::shared_dir();
  return shared.empty() ? "" : shared + "/bionlp";
}

// ---------------------------------------------------------------------------------------------
// Decoder::forward_batch

// Runs a mixed step — a 5-token prompt chunk (logits of its last 2), two single decode tokens, a
// fresh 3-token prompt — over sequences with histories of 9, 1 and 17 tokens, once as one batch and
// once per sequence (`companion`: each sequence shares its step with a 2-token sequence of its own;
// otherwise it runs alone through forward()). Returns the largest logit difference seen, also after
// one more decode token through each cache.
float batch_vs_separate(const Model& model, bool companion) {
  ThreadPool pool(2);
  Decoder decoder(model, pool);
  const ModelConfig& c = model.config();
  const int64_t vocab = c.vocab;
  std::mt19937 rng(7);
  auto ids = [&](int n) {
    std::vector<int32_t> v(static_cast<size_t>(n));
    for (auto& x : v) x = static_cast<int32_t>(rng() % static_cast<uint32_t>(vocab));
    return v;
  };
  const std::vector<std::vector<int32_t>> history = {ids(9), ids(1), ids(17), {}};
  const std::vector<std::vector<int32_t>> step = {ids(5), ids(1), ids(1), ids(3)};
  const std::vector<int64_t> n_logits = {2, 1, 1, 1};
  const std::vector<int32_t> other = ids(2);
  std::vector<std::unique_ptr<KVCache>> separate, batched;
  for (int i = 0; i < 4; ++i) {
    separate.push_back(std::make_unique<KVCache>(c, 64));
    batched.push_back(std::make_unique<KVCache>(c, 64));
  }
  std::vector<float> scratch(static_cast<size_t>(2 * vocab));
  for (size_t i = 0; i < history.size(); ++i) {
    const auto& h = history[i];
    if (h.empty()) continue;
    decoder.forward(h.data(), static_cast<int64_t>(h.size()), *separate[i], 1, scratch.data());
    decoder.forward(h.data(), static_cast<int64_t>(h.size()), *batched[i], 1, scratch.data());
  }
  std::vector<std::vector<float>> want(4), got(4);
  std::vector<DecodeSegment> segments;
  for (size_t i = 0; i < 4; ++i) {
    want[i].resize(static_cast<size_t>(n_logits[i] * vocab));
    got[i].resize(want[i].size());
    const DecodeSegment mine{step[i].data(), static_cast<int64_t>(step[i].size()), separate[i].get(), n_logits[i],
                             want[i].data()};
    if (companion) {
      KVCache other_cache(c, 8);
      const std::vector<DecodeSegment> pair = {{other.data(), 2, &other_cache, 2, scratch.data()}, mine};
      decoder.forward_batch(pair);
    } else {
      decoder.forward(mine.tokens, mine.n, *mine.cache, mine.n_logits, mine.logits);
    }
    segments.push_back({step[i].data(), static_cast<int64_t>(step[i].size()), batched[i].get(), n_logits[i], got[i].data()});
  }
  decoder.forward_batch(segments);
  float max_err = 0.0f;
  auto compare = [&](const std::vector<float>& a, const std::vector<float>& b, int64_t n) {
    for (int64_t k = 0; k < n; ++k) max_err = std::max(max_err, std::fabs(a[static_cast<size_t>(k)] - b[static_cast<size_t>(k)]));
  };
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_EQ(batched[i]->size(), separate[i]->size());
    compare(want[i], got[i], n_logits[i] * vocab);
  }
  // The caches hold the same keys and values: one more decode token each.
  std::vector<DecodeSegment> next;
  std::vector<int32_t> last(4);
  for (size_t i = 0; i < 4; ++i) {
    last[i] = step[i].back();
    decoder.forward(&last[i], 1, *separate[i], 1, want[i].data());
    next.push_back({&last[i], 1, batched[i].get(), 1, got[i].data()});
  }
  for (auto& s : next) decoder.forward(s.tokens, 1, *s.cache, 1, s.logits);
  for (size_t i = 0; i < 4; ++i) compare(want[i], got[i], vocab);
  return max_err;
}

// Plain weights: a row's dot products are summed in the same order whatever the batch, so a
// sequence's logits in a batch are bit for bit those of running it alone.
TEST(ServeDecoder, ForwardBatchEqualsEachSequenceAlone) {
  EXPECT_EQ(batch_vs_separate(*Model::load(demo_model()), false), 0.0f);
  // Sliding-window layers and softcaps (gemma2), q/k norms (qwen3), f32 and f16 storage.
  EXPECT_EQ(batch_vs_separate(*Model::load(test::fixtures_dir() + "/models/gemma2/f32"), false), 0.0f);
  EXPECT_EQ(batch_vs_separate(*Model::load(test::fixtures_dir() + "/models/qwen3/f16"), false), 0.0f);
}

// Quantized weights: the one-token (decode) kernels sum in another order than the many-token ones,
// so a row run alone and the same row in a batch differ in rounding (as prefill and decode already
// do). What batching must not do is mix rows: in any step of 2+ rows, a sequence's logits do not
// depend on which sequences share the step.
TEST(ServeDecoder, ForwardBatchRowsAreIndependentOnQuantizedWeights) {
  for (const char* q : {"q8_0", "q4_k", "nf4", "int8"}) {
    auto model = Model::load(demo_model());
    ThreadPool pool(2);
    quantize_model(*model, plan_quantization(*model, parse_quant_recipe(q)), pool);
    EXPECT_EQ(batch_vs_separate(*model, true), 0.0f) << q;
  }
}

// top_token: the first of equal maxima (std::max_element's choice) at every length and place.
TEST(ServeDecoder, TopTokenIsTheFirstLargestLogit) {
  std::mt19937 rng(3);
  std::normal_distribution<float> logit(0.0f, 4.0f);
  for (const int64_t n : {int64_t{1}, int64_t{7}, int64_t{31}, int64_t{32}, int64_t{33}, int64_t{1000}, int64_t{128256}}) {
    std::vector<float> v(static_cast<size_t>(n));
    for (int rep = 0; rep < 20; ++rep) {
      for (auto& x : v) x = logit(rng);
      if (rep % 4 == 1) v[static_cast<size_t>(rng() % n)] = 100.0f;  // one clear winner anywhere
      if (rep % 4 == 2 && n > 1) {  // a tie: the lower id wins
        const size_t a = rng() % static_cast<size_t>(n), b = rng() % static_cast<size_t>(n);
        v[a] = v[b] = 50.0f;
      }
      if (rep % 4 == 3) std::fill(v.begin(), v.end(), -3.0f);  // all equal: id 0
      EXPECT_EQ(top_token(v.data(), n), std::max_element(v.begin(), v.end()) - v.begin()) << n << " " << rep;
    }
  }
}

// sort_by_logit (the sampler's full sort): exactly std::sort's order by (value descending, id ascending),
// with many ties, both zeros, negatives and a wide range.
TEST(ServeDecoder, SortByLogitIsTheComparisonSortsOrder) {
  std::mt19937 rng(5);
  std::vector<uint64_t> order, scratch;
  for (const int64_t n : {int64_t{1}, int64_t{2}, int64_t{100}, int64_t{5000}, int64_t{128256}}) {
    for (int rep = 0; rep < 3; ++rep) {
      std::vector<float> v(static_cast<size_t>(n));
      for (auto& x : v) {
        const uint32_t r = rng();
        x = rep == 0 ? static_cast<float>(static_cast<int>(r % 64) - 32) / 4.0f  // ties everywhere
            : rep == 1 ? (r % 3 == 0 ? 0.0f : r % 3 == 1 ? -0.0f : static_cast<float>(static_cast<int>(r % 2001) - 1000))
                       : std::ldexp(static_cast<float>(r % 1000) - 500.0f, static_cast<int>(rng() % 40) - 20);
      }
      std::vector<int32_t> want(static_cast<size_t>(n));
      std::iota(want.begin(), want.end(), 0);
      std::sort(want.begin(), want.end(), [&](int32_t a, int32_t b) {
        return v[static_cast<size_t>(a)] > v[static_cast<size_t>(b)] ||
               (v[static_cast<size_t>(a)] == v[static_cast<size_t>(b)] && a < b);
      });
      sort_by_logit(v.data(), n, order, scratch);
      ASSERT_EQ(order.size(), want.size());
      for (size_t i = 0; i < want.size(); ++i)
        ASSERT_EQ(static_cast<int32_t>(order[i] & 0xFFFFFFFFu), want[i]) << n << " " << rep << " at " << i;
    }
  }
}

// A segment may ask for its top token instead of (or beside) its logits: the same id as top_token of
// the logits, in a batch or alone; asking for neither buffer, or for a top token without logits, is
// an error before anything runs.
TEST(ServeDecoder, ForwardBatchHandsBackTopTokens) {
  auto model = Model::load(demo_model());
  const ModelConfig& c = model->config();
  ThreadPool pool(2);
  Decoder decoder(*model, pool);
  const std::vector<int32_t> p0 = {5, 17, 3, 9}, p1 = {8, 2}, p2 = {11, 4, 6};
  KVCache a(c, 16), b(c, 16), a2(c, 16), b2(c, 16), d(c, 16);
  std::vector<float> la(static_cast<size_t>(c.vocab)), lb(la.size());
  int32_t ta = -1, tb = -1, td = -1;
  std::vector<DecodeSegment> with_logits = {{p0.data(), 4, &a, 1, la.data()}, {p1.data(), 2, &b, 1, lb.data()}};
  decoder.forward_batch(with_logits);
  std::vector<DecodeSegment> tops = {{p0.data(), 4, &a2, 1, nullptr, &ta}, {p1.data(), 2, &b2, 1, lb.data(), &tb},
                                     {p2.data(), 3, &d, 0, nullptr}};
  decoder.forward_batch(tops);
  EXPECT_EQ(ta, top_token(la.data(), c.vocab));
  EXPECT_EQ(tb, top_token(lb.data(), c.vocab));
  const DecodeSegment alone{&ta, 1, &a2, 1, nullptr, &td};
  decoder.forward_batch(std::span<const DecodeSegment>(&alone, 1));
  decoder.forward(&ta, 1, a, 1, la.data());
  EXPECT_EQ(td, top_token(la.data(), c.vocab));
  KVCache e(c, 16);
  const std::vector<DecodeSegment> no_buffer = {{p0.data(), 4, &e, 1, nullptr}};
  EXPECT_THROW(decoder.forward_batch(no_buffer), Error);
  const std::vector<DecodeSegment> top_without_logits = {{p0.data(), 4, &e, 0, nullptr, &ta}};
  EXPECT_THROW(decoder.forward_batch(top_without_logits), Error);
  EXPECT_EQ(e.size(), 0);
}

TEST(ServeDecoder, ForwardBatchValidatesBeforeTouchingCaches) {
  auto model = Model::load(demo_model());
  ThreadPool pool(1);
  Decoder decoder(*model, pool);
  KVCache a(model->config(), 4), b(model->config(), 4);
  const std::vector<int32_t> ok = {1, 2}, bad = {5, 99999};
  std::vector<float> la(static_cast<size_t>(model->config().vocab)), lb(la.size());
  std::vector<DecodeSegment> shared = {{ok.data(), 2, &a, 1, la.data()}, {ok.data(), 2, &a, 1, lb.data()}};
  EXPECT_THROW(decoder.forward_batch(shared), Error);
  std::vector<DecodeSegment> one_bad = {{ok.data(), 2, &a, 1, la.data()}, {bad.data(), 2, &b, 1, lb.data()}};
  EXPECT_THROW(decoder.forward_batch(one_bad), Error);
  EXPECT_EQ(a.size(), 0);  // nothing ran
  std::vector<DecodeSegment> too_long = {{ok.data(), 2, &a, 1, la.data()}, {ok.data(), 2, &b, 1, lb.data()}};
  decoder.forward_batch(too_long);
  decoder.forward_batch(too_long);
  EXPECT_THROW(decoder.forward_batch(too_long), Error);  // 6 positions in caches of 4
  EXPECT_EQ(a.size(), 4);
}

// A prompt's prefix computed once and copied into other caches: continuing each copy gives the
// logits of the whole sequence run in one cache, bit for bit; bad copies are refused.
TEST(ServeDecoder, CopiedPrefixContinuesAsTheOriginal) {
  auto model = Model::load(demo_model());
  ThreadPool pool(2);
  Decoder decoder(*model, pool);
  const ModelConfig& c = model->config();
  const size_t vocab = static_cast<size_t>(c.vocab);
  const std::vector<int32_t> prefix = {1, 17, 42, 9, 300, 7, 5}, rest = {11, 12, 13};
  KVCache whole(c, 32), shared(c, 32), copy(c, 16);
  std::vector<float> want(vocab), got(vocab);
  std::vector<int32_t> all = prefix;
  all.insert(all.end(), rest.begin(), rest.end());
  decoder.forward(all.data(), static_cast<int64_t>(all.size()), whole, 1, want.data());
  decoder.forward(prefix.data(), static_cast<int64_t>(prefix.size()), shared, 0, nullptr);
  for (const int64_t n : {int64_t{7}, int64_t{4}}) {  // all of it, then part of it (the rest re-run)
    decoder.copy_prefix(shared, copy, n);
    EXPECT_EQ(copy.size(), n);
    const std::vector<int32_t> tail(all.begin() + n, all.end());
    decoder.forward(tail.data(), static_cast<int64_t>(tail.size()), copy, 1, got.data());
    EXPECT_EQ(got, want) << n;
  }
  EXPECT_EQ(shared.size(), 7);  // the source is untouched
  KVCache small(c, 4);
  EXPECT_THROW(decoder.copy_prefix(shared, small, 5), Error);   // more than the target holds
  EXPECT_THROW(decoder.copy_prefix(shared, copy, 8), Error);    // more than the source has
  EXPECT_THROW(decoder.copy_prefix(shared, shared, 3), Error);  // onto itself
  EXPECT_THROW(decoder.copy_prefix(shared, copy, -1), Error);
  decoder.copy_prefix(shared, small, 0);
  EXPECT_EQ(small.size(), 0);
}

// ---------------------------------------------------------------------------------------------
// Stop strings

std::string run_stream(const Tokenizer& tok, const std::vector<int32_t>& ids, const std::vector<std::string>& stop,
                       bool* stopped = nullptr, std::vector<std::string>* pieces = nullptr) {
  TextStream ts(tok, stop);
  std::string out;
  for (int32_t id : ids) {
    const std::string piece = ts.push(id);
    if (pieces) pieces->push_back(piece);
    out += piece;
    if (ts.stopped()) break;
  }
  out += ts.finish();
  if (stopped) *stopped = ts.stopped();
  return out;
}

TEST(ServeText, StopStringsCutTheTextAndHoldBackPossiblePrefixes) {
  auto tok = load_tokenizer(demo_model());
  const std::string text = "The patient received aspirin and heparin; the bleeding stopped.";
  const std::vector<int32_t> ids = tok->encode(text, false, false);
  ASSERT_GT(ids.size(), 5u);
  EXPECT_EQ(run_stream(*tok, ids, {}), text);
  bool stopped = false;
  EXPECT_EQ(run_stream(*tok, ids, {"heparin"}, &stopped), "The patient received aspirin and ");
  EXPECT_TRUE(stopped);
  // The earliest of several stop strings wins; a stop string inside one token's text works too.
  EXPECT_EQ(run_stream(*tok, ids, {"bleeding", "aspi"}, &stopped), "The patient received ");
  EXPECT_EQ(run_stream(*tok, ids, {"ent rec"}, &stopped), "The pati");
  // A stop string that never completes holds text back only while it could, and finish() releases it.
  std::vector<std::string> pieces;
  EXPECT_EQ(run_stream(*tok, ids, {"stopped!"}, &stopped, &pieces), text);
  EXPECT_FALSE(stopped);
  std::string streamed;
  for (const auto& p : pieces) streamed += p;
  EXPECT_EQ(streamed, text.substr(0, text.size() - std::string(" stopped.").size()) + " stopped.")
      << "everything but a possible prefix of the stop string is released as it comes";
  // Non-ASCII text is never split inside a character.
  const std::string greek = "αβγ δέλτα";
  EXPECT_EQ(run_stream(*tok, tok->encode(greek, false, false), {"δ"}), "αβγ ");
}

// ---------------------------------------------------------------------------------------------
// Request validation

TEST(ServeApi, StrictParsingOfTheGenerationRequests) {
  ApiLimits limits;
  limits.max_tokens_cap = 100;
  auto completion = [&](const std::string& body) { return parse_completion_request(parse_body(body, limits), limits); };
  auto chat = [&](const std::string& body) { return parse_chat_request(parse_body(body, limits), limits); };
  auto refused = [&](auto f, const std::string& body, const std::string& needle) {
    try {
      f(body);
      ADD_FAILURE() << "accepted: " << body;
    } catch (const ApiError& e) {
      EXPECT_EQ(e.status, 400) << body;
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  const CompletionRequest c = completion(
      R"({"model": "m", "prompt": "hi", "max_tokens": 7, "temperature": 0, "top_p": 0.5, "top_k": 3, "seed": 42,
          "stop": ["a", "b"], "stream": true, "stream_options": {"include_usage": true}, "logprobs": 2, "n": 1,
          "user": "u", "echo": false, "presence_penalty": 0, "suffix": null})");
  EXPECT_EQ(c.prompt, "hi");
  EXPECT_EQ(c.sampling.max_tokens, 7);
  EXPECT_EQ(c.sampling.temperature, 0.0f);
  EXPECT_EQ(c.sampling.top_k, 3);
  EXPECT_EQ(c.sampling.seed, 42u);
  EXPECT_EQ(c.sampling.stop, (std::vector<std::string>{"a", "b"}));
  EXPECT_TRUE(c.sampling.stream && c.sampling.include_usage);
  EXPECT_EQ(c.sampling.logprobs, 2);
  EXPECT_EQ(completion(R"({"prompt": [1, 2, 3]})").prompt_ids, (std::vector<int32_t>{1, 2, 3}));
  EXPECT_FALSE(completion(R"({"prompt": "x"})").sampling.max_tokens.has_value());

  refused(completion, "", "empty");
  refused(completion, "{", "not valid JSON");
  refused(completion, "[1]", "must be a JSON object");
  refused(completion, R"({"prompt": "x", "tempreature": 1})", "unknown field \"tempreature\"");
  refused(completion, R"({})", "\"prompt\" is required");
  refused(completion, R"({"prompt": 5})", "\"prompt\" must be");
  refused(completion, R"({"prompt": ["a", "b"]})", "one prompt per request");
  refused(completion, R"({"prompt": [1, -2]})", "token ids");
  refused(completion, R"({"prompt": "x", "max_tokens": 101})", "between 1 and 100");
  refused(completion, R"({"prompt": "x", "max_tokens": 0})", "between 1 and 100");
  refused(completion, R"({"prompt": "x", "max_tokens": "5"})", "must be an integer");
  refused(completion, R"({"prompt": "x", "max_tokens": 2.5})", "must be an integer");
  refused(completion, R"({"prompt": "x", "temperature": 3})", "between 0 and 2");
  refused(completion, R"({"prompt": "x", "temperature": "hot"})", "must be a number");
  refused(completion, R"({"prompt": "x", "top_p": 0})", "greater than 0");
  refused(completion, R"({"prompt": "x", "stop": ""})", "non-empty");
  refused(completion, R"({"prompt": "x", "stop": ["a","b","c","d","e"]})", "at most 4");
  refused(completion, R"({"prompt": "x", "n": 2})", "n = 1");
  refused(completion, R"({"prompt": "x", "echo": true})", "echo");
  refused(completion, R"({"prompt": "x", "logprobs": 21})", "between 0 and 20");
  refused(completion, R"({"prompt": "x", "stream_options": {"include_usage": true}})", "only allowed with");
  refused(completion, R"({"prompt": "x", "stream": "yes"})", "true or false");
  refused(completion, std::string(100, '[') + std::string(100, ']'), "nested more than");
  refused(completion, "{\"prompt\": \"\xff\xfe\"}", "not valid JSON");

  const ChatRequest r = chat(R"({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content":
      [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "max_completion_tokens": 9, "logprobs": true,
      "top_logprobs": 3, "response_format": {"type": "text"}})");
  ASSERT_EQ(r.messages.size(), 2u);
  EXPECT_EQ(r.messages[1].content, "ab");
  EXPECT_EQ(r.sampling.max_tokens, 9);
  EXPECT_EQ(r.sampling.logprobs, 3);
  EXPECT_EQ(r.sampling.temperature, 1.0f);  // OpenAI's default
  refused(chat, R"({"messages": []})", "non-empty array");
  refused(chat, R"({"messages": [{"role": "tool", "content": "x"}]})", "system, user or assistant");
  refused(chat, R"({"messages": [{"role": "user"}]})", "content\" is required");
  refused(chat, R"({"messages": [{"role": "user", "content": "x", "extra": 1}]})", "unknown field \"messages[0].extra\"");
  refused(chat, R"({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})", "must be \"text\"");
  refused(chat, R"({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})", "needs \"logprobs\"");
  refused(chat, R"({"messages": [{"role": "user", "content": "x"}], "tools": []})", "tool calls");
  refused(chat, R"({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}})",
          "JSON modes");
}

// ---------------------------------------------------------------------------------------------
// Task endpoints: tokens and offsets

TEST(ServeBioNlp, DatasetTokensWithCodePointAndByteOffsets) {
  const std::string text = "Two (VGB, 5-FU) doses;  β-blocker\ttaken.";
  const auto tokens = split_dataset_tokens(text);
  std::vector<std::string> words;
  for (const auto& t : tokens) words.push_back(t.text);
  EXPECT_EQ(words, (std::vector<std::string>{"Two", "(", "VGB", ",", "5", "-", "FU", ")", "doses", ";", "β", "-",
                                              "blocker", "taken", "."}));
  for (const auto& t : tokens) EXPECT_EQ(text.substr(t.byte_begin, t.byte_end - t.byte_begin), t.text);
  // "β" is two bytes but one code point: later code point offsets trail the byte offsets by one.
  EXPECT_EQ(tokens[10].char_begin, 24u);
  EXPECT_EQ(tokens[10].byte_begin, 24u);
  EXPECT_EQ(tokens[12].char_begin, 26u);
  EXPECT_EQ(tokens[12].byte_begin, 27u);
  EXPECT_EQ(tokens[12].char_end, 33u);
}

TEST(ServeBioNlp, RequestsBecomeEvalExamplesAndAnswersComeFromTheParsers) {
  auto count = [](const std::string& s) { return static_cast<int64_t>(s.size() / 4 + 1); };
  TaskQuery q = parse_task_request(TaskEndpoint::ner, json{{"text", "Exposure to VGB (vigabatrin)."}, {"task", "bc5cdr-chem"}},
                                   true, count);
  EXPECT_EQ(q.example.text, "Exposure to VGB ( vigabatrin ) .");
  EXPECT_EQ(q.prompt, eval::build_prompt(q.task, {eval::PromptMethod::zero_shot, false, "", true}, {}, q.example));
  EXPECT_EQ(q.max_tokens, q.task.max_new_tokens);
  json a = task_answer(q, "Exposure to <span class=\"chemical\">VGB</span> ( <span class=\"chemical\">vigabatrin</span> ) .");
  EXPECT_TRUE(a["parsed"].get<bool>());
  ASSERT_EQ(a["entities"].size(), 2u);
  EXPECT_EQ(a["entities"][0], (json{{"text", "VGB"}, {"start", 12}, {"end", 15}, {"byte_start", 12}, {"byte_end", 15}}));
  EXPECT_EQ(a["entities"][1]["text"], "vigabatrin");

  q = parse_task_request(TaskEndpoint::relation, json{{"text", "@CHEMICAL$ inhibits @GENE$."}, {"task", "chemprot"}}, true, count);
  EXPECT_EQ(task_answer(q, "CPR:4")["label"], "CPR:4");
  EXPECT_TRUE(task_answer(q, "no idea")["label"].is_null());
  q = parse_task_request(TaskEndpoint::classify, json{{"text", "masks reduce spread"}, {"labels", {"Prevention", "Treatment"}}},
                         true, count);
  EXPECT_EQ(q.task.name, "custom");
  EXPECT_EQ(task_answer(q, R"({"Prevention": 1, "Treatment": 0})")["labels"], json({"Prevention"}));
  q = parse_task_request(TaskEndpoint::qa, json{{"question", "Which?"}, {"options", {{"B", "beta"}, {"A", "alpha"}}}}, true, count);
  EXPECT_EQ(q.example.option_letters, (std::vector<std::string>{"A", "B"}));
  a = task_answer(q, "B");
  EXPECT_EQ(a["answer"], "B");
  EXPECT_EQ(a["answer_text"], "beta");
  q = parse_task_request(TaskEndpoint::qa, json{{"question", "Does it?"}, {"context", "It does."}}, true, count);
  EXPECT_EQ(q.task.name, "pubmedqa");
  EXPECT_EQ(task_answer(q, "yes")["answer"], "yes");

  auto refused = [&](TaskEndpoint e, const json& body, const std::string& needle) {
    try {
      parse_task_request(e, body, true, count);
      ADD_FAILURE() << "accepted: " << body.dump();
    } catch (const ApiError& err) {
      EXPECT_EQ(err.status, 400);
      EXPECT_NE(std::string(err.what()).find(needle), std::string::npos) << err.what();
    }
  };
  refused(TaskEndpoint::ner, json{{"text", "x"}, {"task", "chemprot"}}, "use /v1/bionlp/relation");
  refused(TaskEndpoint::ner, json{{"text", "x"}, {"task", "nope"}}, "nope");
  refused(TaskEndpoint::ner, json{{"text", " ;"}, {"task", "ncbi-disease"}, {"x", 1}}, "unknown field");
  refused(TaskEndpoint::relation, json{{"text", "aspirin inhibits COX"}, {"task", "chemprot"}}, "@CHEMICAL$");
  refused(TaskEndpoint::classify, json{{"text", "x"}, {"task", "hoc"}, {"labels", {"a"}}}, "either");
  refused(TaskEndpoint::classify, json{{"text", "x"}, {"labels", {"a", "A"}}}, "twice");
  refused(TaskEndpoint::qa, json{{"question", "q"}, {"options", {{"a", "x"}, {"B", "y"}}}}, "capital letters");
  refused(TaskEndpoint::qa, json{{"question", "q"}}, "either");
}

// ---------------------------------------------------------------------------------------------
// The server on loopback

struct Shared {
  std::unique_ptr<Model> model;
  std::unique_ptr<Tokenizer> tokenizer;
};
Shared& demo() {
  static Shared s = [] {
    Shared x;
    x.model = Model::load(demo_model());
    x.tokenizer = load_tokenizer(demo_model());
    return x;
  }();
  return s;
}

// A server over the demo model on an ephemeral loopback port, with its own thread pool.
class TestServer {
 public:
  explicit TestServer(ServerOptions o = {}, int threads = 2) : pool_(threads) {
    o.port = 0;
    if (o.model_name == "bioquant") o.model_name = "biomed-tiny";
    if (!o.log) o.log = [this](const std::string& line) {
      std::lock_guard<std::mutex> lock(mutex_);
      log_ += line + "\n";
    };
    server_ = std::make_unique<Server>(*demo().model, *demo().tokenizer, pool_, o);
    server_->start();
  }
  ~TestServer() { server_->shutdown(std::chrono::milliseconds(0)); }
  Server& server() { return *server_; }
  int port() const { return server_->port(); }
  std::unique_ptr<httplib::Client> client(const std::string& key = "") const {
    auto c = std::make_unique<httplib::Client>("127.0.0.1", port());
    c->set_read_timeout(120, 0);
    if (!key.empty()) c->set_bearer_token_auth(key);
    return c;
  }
  std::string log() {
    std::lock_guard<std::mutex> lock(mutex_);
    return log_;
  }

 private:
  ThreadPool pool_;
  std::unique_ptr<Server> server_;
  std::mutex mutex_;
  std::string log_;
};

json post(httplib::Client& c, const std::string& path, const json& body, int want_status = 200) {
  auto r = c.Post(path, body.dump(), "application/json");
  EXPECT_TRUE(r) << path;
  if (!r) return json();
  EXPECT_EQ(r->status, want_status) << path << ": " << r->body;
  EXPECT_EQ(r->get_header_value("Content-Type"), "application/json") << path;
  return json::parse(r->body);
}

// The "data: ..." events of a server-sent event stream, "[DONE]" last.
std::vector<std::string> sse_events(const std::string& body) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos < body.size()) {
    size_t end = body.find("\n\n", pos);
    if (end == std::string::npos) end = body.size();
    const std::string event = body.substr(pos, end - pos);
    EXPECT_EQ(event.rfind("data: ", 0), 0u) << event;
    out.push_back(event.substr(6));
    pos = end + 2;
  }
  return out;
}

// What eval's LocalBackend answers (greedy, chat template, EOS ends the answer).
std::string local_answer(const std::string& prompt, int max_tokens) {
  ThreadPool pool(1);
  eval::LocalBackend local(*demo().model, *demo().tokenizer, pool, true);
  return local.generate(prompt, max_tokens);
}

// eval --batch: prompts answered together are answered as one by one (plain weights on the CPU:
// bit-identical logits), whatever their lengths, shared prefixes, budgets and EOS; the shared
// prefix is computed once.
TEST(EvalBackend, BatchedAnswersAreTheOneByOneAnswers) {
  ThreadPool pool(2);
  eval::LocalBackend one(*demo().model, *demo().tokenizer, pool, true), many(*demo().model, *demo().tokenizer, pool, true);
  const std::string task = "TASK: answer the question with yes, no or maybe.\n\nQuestion: ";
  const std::vector<std::string> prompts = {task + "Does aspirin reduce fever?",
                                            task + "Is metformin used for type 2 diabetes?",
                                            task + "Does",  // a prefix of the others, nearly
                                            task + "Does aspirin reduce fever?",
                                            "Name the chemicals: Cisplatin and 5-fluorouracil were given."};
  for (const int budget : {0, 1, 12, 40}) {
    std::vector<std::string> want;
    for (const auto& p : prompts) want.push_back(one.generate(p, budget));
    EXPECT_EQ(many.generate_batch(prompts, budget), want) << budget;
    const std::vector<std::string> first3(prompts.begin(), prompts.begin() + 3);
    EXPECT_EQ(many.generate_batch(first3, budget), std::vector<std::string>(want.begin(), want.begin() + 3)) << budget;
  }
  // Reuse: the task line shared by the first three is computed once, then kept for the next batch.
  const eval::BackendCounters before = many.counters();
  const std::vector<std::string> again(prompts.begin(), prompts.begin() + 2);
  EXPECT_EQ(many.generate_batch(again, 4), (std::vector<std::string>{one.generate(again[0], 4), one.generate(again[1], 4)}));
  const eval::BackendCounters& after = many.counters();
  int64_t tokens = 0;
  for (const auto& p : again) tokens += static_cast<int64_t>(many.encode_prompt(p).size());
  const int64_t computed = after.prompt_tokens_computed - before.prompt_tokens_computed;
  EXPECT_EQ(after.prompts - before.prompts, 2);
  EXPECT_EQ(computed + after.prompt_tokens_reused - before.prompt_tokens_reused, tokens);
  EXPECT_LT(computed, tokens / 2) << "the shared instruction was recomputed";
}

// What LocalBackend::choose must answer, computed without its KV-cache reuse: every candidate's
// context rerun from scratch. loglik: the choice whose tokens' summed log-probabilities after the
// context are largest (the first of equal sums); constrained: greedy over the choices' tokens, EOS
// against the continuing tokens where a choice is complete. Returns the choice and, for loglik, the
// margin to the runner-up (near ties are not the test's business).
struct Choice {
  size_t index = 0;
  double margin = 0;
};
std::vector<float> context_logits(Decoder& decoder, const std::vector<int32_t>& ids, int64_t rows) {
  KVCache cache(decoder.model().config(), static_cast<int64_t>(ids.size()));
  std::vector<float> out(static_cast<size_t>(rows * decoder.model().config().vocab));
  decoder.forward(ids.data(), static_cast<int64_t>(ids.size()), cache, rows, out.data());
  return out;
}
Choice reference_choice(Decoder& decoder, const Tokenizer& tok, std::vector<int32_t> context,
                        const std::vector<std::string>& choices, eval::ScoringMode mode) {
  const size_t vocab = static_cast<size_t>(decoder.model().config().vocab);
  std::vector<std::vector<int32_t>> cand;
  for (const auto& c : choices) cand.push_back(tok.encode(c, false, false));
  if (mode == eval::ScoringMode::loglik) {
    std::vector<double> lp;
    for (const auto& c : cand) {
      std::vector<int32_t> ids = context;
      ids.insert(ids.end(), c.begin(), c.end());
      const int64_t n = static_cast<int64_t>(c.size());
      const std::vector<float> rows = context_logits(decoder, ids, n + 1);  // from the context's last token on
      double sum = 0;
      for (int64_t t = 0; t < n; ++t) {
        const float* r = rows.data() + static_cast<size_t>(t) * vocab;
        const float m = *std::max_element(r, r + vocab);
        double z = 0;
        for (size_t v = 0; v < vocab; ++v) z += std::exp(static_cast<double>(r[v] - m));
        sum += static_cast<double>(r[c[static_cast<size_t>(t)]] - m) - std::log(z);
      }
      lp.push_back(sum);
    }
    Choice best;
    for (size_t c = 1; c < lp.size(); ++c)
      if (lp[c] > lp[best.index]) best.index = c;
    best.margin = std::numeric_limits<double>::infinity();
    for (size_t c = 0; c < lp.size(); ++c)
      if (c != best.index) best.margin = std::min(best.margin, lp[best.index] - lp[c]);
    return best;
  }
  std::vector<size_t> alive(cand.size());
  std::iota(alive.begin(), alive.end(), size_t{0});
  for (size_t step = 0;; ++step) {
    std::vector<size_t> complete;
    for (size_t c : alive)
      if (cand[c].size() == step) complete.push_back(c);
    if (complete.size() == alive.size()) return {complete.front(), 0};
    const std::vector<float> row = context_logits(decoder, context, 1);
    int32_t best_id = -1;
    for (size_t c : alive)
      if (cand[c].size() > step && (best_id < 0 || row[static_cast<size_t>(cand[c][step])] > row[static_cast<size_t>(best_id)]))
        best_id = cand[c][step];
    if (!complete.empty()) {
      float end = -std::numeric_limits<float>::infinity();
      for (int32_t e : decoder.model().config().eos_ids) end = std::max(end, row[static_cast<size_t>(e)]);
      if (end >= row[static_cast<size_t>(best_id)]) return {complete.front(), 0};
    }
    std::vector<size_t> next;
    for (size_t c : alive)
      if (cand[c].size() > step && cand[c][step] == best_id) next.push_back(c);
    alive = next;
    context.push_back(best_id);
  }
}

// The scoring modes of the multiple-choice tasks pick what the model itself prefers, whatever the
// order of the choices, with the context kept in the KV cache from one question to the next.
// device >= 0: the backend on that GPU, in exact numerics against the CPU engine's (the same floats).
void expect_scored_choices_are_the_models_own(int device) {
  ThreadPool pool(2);
  const bool exact = device >= 0;
  Decoder decoder(*demo().model, pool, -1, KvType::BF16, exact);
  const Tokenizer& tok = *demo().tokenizer;
  eval::LocalBackend local(*demo().model, tok, pool, true, device, exact ? KvType::F32 : KvType::BF16, exact);
  const std::string task = "TASK: classify the abstract.\n\nAbstract: ";
  const std::vector<std::string> abstracts = {
      "Aspirin reduced fever in 40 children.", "Cisplatin caused nephrotoxicity in rats.",
      "Metformin lowers glucose.", "No effect of vitamin D on fractures was found.",
      "Tumour growth was inhibited by the drug.", "The virus spread among hospital staff."};
  // Choices of one to several tokens, one a prefix of another (the constrained EOS rule); the second
  // set without the first's favourite.
  const std::vector<std::vector<std::string>> choice_sets = {
      {"yes", "no", "maybe", "cancer", "cancer treatment", "viral infection spread"},
      {"maybe", "cancer", "cancer treatment", "viral infection spread", "fever"}};
  std::set<std::string> winners[2];
  for (const auto mode : {eval::ScoringMode::loglik, eval::ScoringMode::constrained}) {
    for (size_t k = 0; k < abstracts.size() * choice_sets.size(); ++k) {
      const std::string& abstract = abstracts[k / choice_sets.size()];
      const std::vector<std::string>& choices = choice_sets[k % choice_sets.size()];
      const std::string prompt = task + abstract;
      SCOPED_TRACE(std::string(eval::scoring_mode_name(mode)) + ": " + abstract);
      std::vector<int32_t> context = local.encode_prompt(prompt);
      const std::string fixed = "Answer:";
      const auto fixed_ids = tok.encode(fixed, false, false);
      context.insert(context.end(), fixed_ids.begin(), fixed_ids.end());
      const Choice want = reference_choice(decoder, tok, context, choices, mode);
      if (mode == eval::ScoringMode::loglik && want.margin < 1e-3) continue;  // a near tie: either is right
      winners[mode == eval::ScoringMode::loglik ? 0 : 1].insert(choices[want.index]);
      const std::vector<eval::AnswerSegment> plan = {{fixed, {}}, {"", choices}};
      EXPECT_EQ(local.choose(prompt, plan, mode), fixed + choices[want.index]);
      std::vector<std::string> reversed(choices.rbegin(), choices.rend());
      EXPECT_EQ(local.choose(prompt, {{fixed, {}}, {"", reversed}}, mode), fixed + choices[want.index]);
    }
  }
  // Not one answer for everything: the comparison tells the choices apart.
  EXPECT_GE(winners[0].size(), 2u);
  EXPECT_GE(winners[1].size(), 2u);
}
TEST(EvalBackend, ScoredChoicesAreTheModelsOwnPreference) { expect_scored_choices_are_the_models_own(-1); }
// On a GPU the scoring rows come back into page-locked memory (HostFloats).
TEST(GpuEvalBackend, ScoredChoicesAreTheCpuEnginesInExactNumerics) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  expect_scored_choices_are_the_models_own(0);
}

TEST(ServeHttp, HealthAndModels) {
  TestServer s;
  auto c = s.client();
  auto r = c->Get("/health");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(json::parse(r->body), (json{{"status", "ok"}}));
  r = c->Get("/v1/models");
  ASSERT_TRUE(r);
  const json models = json::parse(r->body);
  EXPECT_EQ(models["object"], "list");
  ASSERT_EQ(models["data"].size(), 1u);
  EXPECT_EQ(models["data"][0]["id"], "biomed-tiny");
  EXPECT_EQ(models["data"][0]["max_model_len"], 1024);
  r = c->Get("/v1/models/biomed-tiny");
  ASSERT_TRUE(r);
  EXPECT_EQ(json::parse(r->body)["id"], "biomed-tiny");
  r = c->Get("/v1/models/gpt-4");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 404);
  EXPECT_EQ(json::parse(r->body)["error"]["code"], "model_not_found");
}

TEST(ServeHttp, ChatAndCompletionsGiveEvalsGreedyAnswer) {
  TestServer s;
  auto c = s.client();
  const std::string prompt = "TASK: answer the question.\n\nQuestion: Does aspirin reduce fever?";
  const std::string want = local_answer(prompt, 24);
  json r = post(*c, "/v1/chat/completions",
                {{"model", "biomed-tiny"}, {"messages", {{{"role", "user"}, {"content", prompt}}}}, {"max_tokens", 24},
                 {"temperature", 0}});
  EXPECT_EQ(r["object"], "chat.completion");
  EXPECT_EQ(r["model"], "biomed-tiny");
  EXPECT_EQ(r["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(r["choices"][0]["message"]["content"], want);
  EXPECT_TRUE(r["choices"][0]["logprobs"].is_null());
  ThreadPool one(1);
  const auto ids = eval::LocalBackend(*demo().model, *demo().tokenizer, one, true).encode_prompt(prompt);
  EXPECT_EQ(r["usage"]["prompt_tokens"], ids.size());
  const int64_t completion = r["usage"]["completion_tokens"];
  EXPECT_EQ(r["choices"][0]["finish_reason"], completion < 24 ? "stop" : "length");
  EXPECT_EQ(r["usage"]["total_tokens"], ids.size() + static_cast<size_t>(completion));

  // Completions: the raw prompt with the tokenizer's BOS, like eval --no-chat-template.
  ThreadPool pool(1);
  eval::LocalBackend plain(*demo().model, *demo().tokenizer, pool, false);
  r = post(*c, "/v1/completions", {{"prompt", prompt + "\nAnswer:"}, {"max_tokens", 12}, {"temperature", 0}});
  EXPECT_EQ(r["object"], "text_completion");
  EXPECT_EQ(r["choices"][0]["text"], plain.generate(prompt + "\nAnswer:", 12));
  // Default max_tokens of completions is OpenAI's 16; token-id prompts work too.
  const auto prompt_ids = demo().tokenizer->encode(prompt, true);
  r = post(*c, "/v1/completions", {{"prompt", prompt_ids}, {"temperature", 0}, {"stop", nullptr}});
  EXPECT_LE(r["usage"]["completion_tokens"].get<int>(), 16);
  EXPECT_EQ(r["usage"]["prompt_tokens"], prompt_ids.size());
}

TEST(ServeHttp, SamplingIsSeededAndMaxTokensAndStopAreHonoured) {
  TestServer s;
  auto c = s.client();
  const json base = {{"prompt", "Aspirin is"}, {"max_tokens", 20}, {"temperature", 1.0}, {"top_p", 0.95}};
  json a = base, b = base;
  a["seed"] = 11;
  b["seed"] = 11;
  const std::string ta = post(*c, "/v1/completions", a)["choices"][0]["text"];
  EXPECT_EQ(post(*c, "/v1/completions", b)["choices"][0]["text"], ta);
  std::set<std::string> seen;
  for (int seed = 0; seed < 6; ++seed) {
    json j = base;
    j["seed"] = seed;
    j["temperature"] = 2.0;
    j["top_p"] = 1.0;
    seen.insert(post(*c, "/v1/completions", j)["choices"][0]["text"].get<std::string>());
  }
  EXPECT_GT(seen.size(), 1u) << "different seeds sample different text";

  // max_tokens: exactly that many tokens (unless EOS), finish_reason length.
  json g = {{"prompt", "The"}, {"max_tokens", 5}, {"temperature", 0}};
  json r = post(*c, "/v1/completions", g);
  if (r["choices"][0]["finish_reason"] == "length") {
    EXPECT_EQ(r["usage"]["completion_tokens"], 5);
  }
  // A stop string from the middle of the greedy text cuts it there.
  g["max_tokens"] = 40;
  const std::string full = post(*c, "/v1/completions", g)["choices"][0]["text"];
  ASSERT_GT(full.size(), 12u) << "the demo model's greedy continuation is long enough";
  const std::string stop = full.substr(full.size() / 2, 3);
  g["stop"] = {stop, "\x01never"};
  r = post(*c, "/v1/completions", g);
  EXPECT_EQ(r["choices"][0]["text"], full.substr(0, full.find(stop)));
  EXPECT_EQ(r["choices"][0]["finish_reason"], "stop");
}

TEST(ServeHttp, LogprobsInBothShapes) {
  TestServer s;
  auto c = s.client();
  json r = post(*c, "/v1/chat/completions",
                {{"messages", {{{"role", "user"}, {"content", "Name a drug."}}}}, {"max_tokens", 6}, {"temperature", 0},
                 {"logprobs", true}, {"top_logprobs", 3}});
  const json& content = r["choices"][0]["logprobs"]["content"];
  ASSERT_EQ(content.size(), r["usage"]["completion_tokens"].get<size_t>());
  std::string joined;
  for (const json& t : content) {
    EXPECT_LE(t["logprob"].get<double>(), 0.0);
    ASSERT_EQ(t["top_logprobs"].size(), 3u);
    // Greedy: the chosen token is the most likely one.
    EXPECT_EQ(t["top_logprobs"][0]["token"], t["token"]);
    EXPECT_FLOAT_EQ(t["top_logprobs"][0]["logprob"].get<float>(), t["logprob"].get<float>());
    EXPECT_GE(t["top_logprobs"][0]["logprob"].get<double>(), t["top_logprobs"][1]["logprob"].get<double>());
    std::string bytes;
    for (int b : t["bytes"]) bytes += static_cast<char>(b);
    EXPECT_EQ(bytes, t["token"].get<std::string>());
    joined += bytes;
  }
  EXPECT_EQ(joined, r["choices"][0]["message"]["content"]);
  r = post(*c, "/v1/completions", {{"prompt", "Aspirin"}, {"max_tokens", 4}, {"temperature", 0}, {"logprobs", 2}});
  const json& lp = r["choices"][0]["logprobs"];
  ASSERT_EQ(lp["tokens"].size(), lp["token_logprobs"].size());
  ASSERT_EQ(lp["top_logprobs"].size(), lp["tokens"].size());
  EXPECT_EQ(lp["text_offset"][0], 0);
  for (const json& top : lp["top_logprobs"]) EXPECT_EQ(top.size(), 2u);
}

TEST(ServeHttp, StreamingSendsTheSameTextAsServerSentEvents) {
  TestServer s;
  auto c = s.client();
  const json messages = {{{"role", "user"}, {"content", "List three antibiotics."}}};
  const std::string want =
      post(*c, "/v1/chat/completions", {{"messages", messages}, {"max_tokens", 30}, {"temperature", 0}})["choices"][0]
                                                                                                         ["message"]
                                                                                                         ["content"];
  auto r = c->Post("/v1/chat/completions",
                   json{{"messages", messages}, {"max_tokens", 30}, {"temperature", 0}, {"stream", true},
                        {"stream_options", {{"include_usage", true}}}}
                       .dump(),
                   "application/json");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 200);
  EXPECT_EQ(r->get_header_value("Content-Type"), "text/event-stream");
  const auto events = sse_events(r->body);
  ASSERT_GE(events.size(), 4u);
  EXPECT_EQ(events.back(), "[DONE]");
  std::string text;
  std::string finish;
  json usage;
  for (size_t i = 0; i + 1 < events.size(); ++i) {
    const json e = json::parse(events[i]);
    EXPECT_EQ(e["object"], "chat.completion.chunk");
    if (e.contains("usage")) {
      usage = e["usage"];
      EXPECT_TRUE(e["choices"].empty());
      continue;
    }
    if (i == 0) {
      EXPECT_EQ(e["choices"][0]["delta"]["role"], "assistant");
    }
    const json& ch = e["choices"][0];
    if (ch["delta"].contains("content")) text += ch["delta"]["content"].get<std::string>();
    if (!ch["finish_reason"].is_null()) finish = ch["finish_reason"];
  }
  EXPECT_EQ(text, want);
  EXPECT_FALSE(finish.empty());
  EXPECT_GT(usage["completion_tokens"].get<int>(), 0);

  // Completions stream, with a stop string.
  r = c->Post("/v1/completions", json{{"prompt", "Aspirin"}, {"max_tokens", 20}, {"temperature", 0}, {"stream", true}}.dump(),
              "application/json");
  ASSERT_TRUE(r);
  std::string streamed;
  for (const auto& e : sse_events(r->body))
    if (e != "[DONE]") streamed += json::parse(e)["choices"][0]["text"].get<std::string>();
  EXPECT_EQ(streamed, post(*c, "/v1/completions", {{"prompt", "Aspirin"}, {"max_tokens", 20}, {"temperature", 0}})["choices"][0]["text"]);

  // Tokens arrive as they are made: the first event comes while generation still runs.
  httplib::Request req;
  req.method = "POST";
  req.path = "/v1/completions";
  req.body = json{{"prompt", "The"}, {"max_tokens", 200}, {"temperature", 1.0}, {"seed", 3}, {"stream", true}}.dump();
  req.set_header("Content-Type", "application/json");
  int chunks = 0;
  req.content_receiver = [&](const char*, size_t, uint64_t, uint64_t) {
    ++chunks;
    return chunks < 3;  // then hang up: the server must notice and stop generating
  };
  httplib::Response res;
  httplib::Error err = httplib::Error::Success;
  c->send(req, res, err);
  EXPECT_GE(chunks, 1);
  // The server is still fine afterwards.
  EXPECT_EQ(c->Get("/health")->status, 200);
}

TEST(ServeHttp, ConcurrentRequestsAreBatchedAndAnswerAsAlone) {
  TestServer s;
  const std::vector<std::string> prompts = {"Aspirin", "Heparin is", "The patient", "Metformin lowers", "Cancer",
                                            "In this study", "Ibuprofen", "The gene"};
  std::vector<std::string> alone;
  {
    auto c = s.client();
    for (const auto& p : prompts)
      alone.push_back(post(*c, "/v1/completions", {{"prompt", p}, {"max_tokens", 24}, {"temperature", 0}})["choices"][0]["text"]);
  }
  std::vector<std::string> together(prompts.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < prompts.size(); ++i) {
    threads.emplace_back([&, i] {
      auto c = s.client();
      auto r = c->Post("/v1/completions", json{{"prompt", prompts[i]}, {"max_tokens", 24}, {"temperature", 0}}.dump(),
                       "application/json");
      if (r && r->status == 200) together[i] = json::parse(r->body)["choices"][0]["text"];
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(together, alone) << "batching must not change any answer";
  EXPECT_GT(s.server().stats().max_batch_seen, 1) << "concurrent requests shared decoding steps";

  // Seeded sampling (the sequences of a step sample in parallel, each with its own sampler), some with
  // log-probabilities: the same text together as alone.
  const auto sampled = [&](size_t i) {
    json j = {{"prompt", prompts[i]}, {"max_tokens", 16}, {"temperature", 1.0}, {"top_p", 0.95}, {"seed", 100 + i}};
    if (i % 3 == 0) j["logprobs"] = 2;
    return j;
  };
  std::vector<json> alone_sampled, together_sampled(prompts.size());
  {
    auto c = s.client();
    for (size_t i = 0; i < prompts.size(); ++i) alone_sampled.push_back(post(*c, "/v1/completions", sampled(i))["choices"][0]);
  }
  threads.clear();
  for (size_t i = 0; i < prompts.size(); ++i) {
    threads.emplace_back([&, i] {
      auto c = s.client();
      auto r = c->Post("/v1/completions", sampled(i).dump(), "application/json");
      if (r && r->status == 200) together_sampled[i] = json::parse(r->body)["choices"][0];
    });
  }
  for (auto& t : threads) t.join();
  for (size_t i = 0; i < prompts.size(); ++i) {
    EXPECT_EQ(together_sampled[i]["text"], alone_sampled[i]["text"]) << i;
    EXPECT_EQ(together_sampled[i]["logprobs"], alone_sampled[i]["logprobs"]) << i;
  }
}

TEST(ServeHttp, TaskEndpoints) {
  TestServer s;
  auto c = s.client();
  const std::string text = "Two hundred people with epilepsy were grouped by exposure to VGB (vigabatrin) or carbamazepine.";
  json r = post(*c, "/v1/bionlp/ner", {{"text", text}, {"task", "bc5cdr-chem"}});
  EXPECT_EQ(r["task"], "bc5cdr-chem");
  EXPECT_EQ(r["entity_class"], "chemical");
  EXPECT_TRUE(r["output"].is_string());
  // The answer is eval's: the same prompt through LocalBackend, read by the same parser.
  auto count = [](const std::string&) { return int64_t(1); };
  const TaskQuery q = parse_task_request(TaskEndpoint::ner, json{{"text", text}, {"task", "bc5cdr-chem"}}, true, count);
  const std::string local = local_answer(q.prompt, q.max_tokens);
  EXPECT_EQ(r["output"], local);
  EXPECT_EQ(r["entities"], task_answer(q, local)["entities"]);
  for (const json& e : r["entities"]) {
    const size_t b = e["byte_start"], end = e["byte_end"];
    EXPECT_EQ(text.substr(b, end - b), e["text"]);
  }
  r = post(*c, "/v1/bionlp/relation", {{"text", "@CHEMICAL$ inhibited @GENE$ activity."}, {"task", "chemprot"}});
  EXPECT_TRUE(r.contains("label"));
  EXPECT_TRUE(r["label"].is_null() || r["label"].is_string());
  r = post(*c, "/v1/bionlp/relation", {{"text", "@DRUG$ increases @DRUG$ levels."}, {"task", "ddi2013"}});
  EXPECT_TRUE(r.contains("parsed"));
  r = post(*c, "/v1/bionlp/classify", {{"text", "Masks and distancing reduced transmission."}, {"task", "litcovid"}});
  EXPECT_TRUE(r["labels"].is_array());
  r = post(*c, "/v1/bionlp/classify", {{"text", "Tumor cells invaded the stroma."}, {"labels", {"invasion", "apoptosis"}}});
  EXPECT_EQ(r["task"], "custom");
  for (const json& l : r["labels"]) EXPECT_TRUE(l == "invasion" || l == "apoptosis");
  r = post(*c, "/v1/bionlp/qa",
           {{"question", "Which drug is an anticoagulant?"}, {"options", {{"A", "heparin"}, {"B", "insulin"}, {"C", "aspirin"}}}});
  EXPECT_EQ(r["task"], "medqa");
  if (r["parsed"].get<bool>()) {
    EXPECT_EQ(r["answer_text"], json({{"A", "heparin"}, {"B", "insulin"}, {"C", "aspirin"}})[r["answer"].get<std::string>()]);
  }
  r = post(*c, "/v1/bionlp/qa", {{"question", "Does heparin prevent clots?"}, {"context", "Heparin prevented clots in 90% of patients."}});
  EXPECT_EQ(r["task"], "pubmedqa");
  EXPECT_GT(r["usage"]["prompt_tokens"].get<int>(), 10);
  post(*c, "/v1/bionlp/ner", {{"text", "x"}, {"task", "chemprot"}}, 400);
  post(*c, "/v1/bionlp/qa", {{"question", "q"}}, 400);
}

// Sends raw bytes to the server; the answer's head and Content-Length bytes of body (the
// connection may stay open).
std::string raw_http(int port, const std::string& bytes) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  EXPECT_EQ(::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL), static_cast<ssize_t>(bytes.size()));
  timeval tv{5, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  std::string answer;
  char buf[2048];
  ssize_t n = 0;
  while ((n = ::recv(fd, buf, sizeof buf, 0)) > 0) {
    answer.append(buf, static_cast<size_t>(n));
    const size_t head = answer.find("\r\n\r\n"), len = answer.find("Content-Length: ");
    if (head != std::string::npos && len != std::string::npos &&
        answer.size() >= head + 4 + std::stoul(answer.substr(len + 16)))
      break;
  }
  ::close(fd);
  return answer;
}

TEST(ServeHttp, ErrorsAreJsonWithTheRightStatus) {
  ServerOptions o;
  o.max_body_bytes = 4096;
  o.limits.max_tokens_cap = 64;
  o.scheduler.context = 64;
  TestServer s(o);
  auto c = s.client();
  auto expect = [&](httplib::Result r, int status, const std::string& needle) {
    ASSERT_TRUE(r);
    EXPECT_EQ(r->status, status) << r->body;
    const json e = json::parse(r->body);
    ASSERT_TRUE(e.contains("error")) << r->body;
    EXPECT_NE(e["error"]["message"].get<std::string>().find(needle), std::string::npos) << r->body;
    EXPECT_TRUE(e["error"]["type"].is_string());
  };
  expect(c->Post("/v1/completions", "{not json", "application/json"), 400, "not valid JSON");
  expect(c->Post("/v1/completions", "\"a string\"", "application/json"), 400, "JSON object");
  expect(c->Post("/v1/completions", R"({"prompt": "x", "bogus": 1})", "application/json"), 400, "unknown field");
  expect(c->Post("/v1/chat/completions", R"({"messages": "hi"})", "application/json"), 400, "messages");
  expect(c->Post("/v1/completions", R"({"prompt": "x", "max_tokens": 65})", "application/json"), 400, "between 1 and 64");
  expect(c->Post("/v1/completions", R"({"prompt": [1, 99999]})", "application/json"), 400, "outside the vocabulary");
  std::string long_prompt;
  for (int i = 0; i < 100; ++i) long_prompt += " w" + std::to_string(i);
  expect(c->Post("/v1/completions", json{{"prompt", long_prompt}}.dump(), "application/json"), 400, "context");
  expect(c->Post("/v1/completions", R"({"prompt": "x", "model": "gpt-4"})", "application/json"), 404, "not served");
  expect(c->Post("/v1/completions", std::string(5000, ' '), "application/json"), 413, "larger than 4096");
  expect(c->Post("/v1/nothing", "{}", "application/json"), 404, "no such endpoint");
  expect(c->Get("/v2/models"), 404, "no such endpoint");
  expect(c->Get("/v1/completions"), 405, "not allowed");
  expect(c->Post("/v1/models", "{}", "application/json"), 405, "not allowed");
  // Raw sockets: malformed HTTP gets a JSON 400; bodies without a Content-Length (chunked, or read
  // to the end of the connection, which httplib would take whole into memory) get 411.
  auto raw = [&](const std::string& bytes) { return raw_http(s.port(), bytes); };
  std::string answer = raw("GARBAGE\r\n\r\n");
  EXPECT_EQ(answer.rfind("HTTP/1.1 400", 0), 0u) << answer;
  EXPECT_NE(answer.find("malformed HTTP request"), std::string::npos) << answer;
  answer = raw("POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               "5\r\n{\"pro\r\n0\r\n\r\n");
  EXPECT_EQ(answer.rfind("HTTP/1.1 411", 0), 0u) << answer;
  EXPECT_NE(answer.find("Content-Length"), std::string::npos) << answer;
  answer = raw("POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n{\"prompt\": \"x\"}");
  EXPECT_EQ(answer.rfind("HTTP/1.1 411", 0), 0u) << answer;
  EXPECT_EQ(c->Get("/health")->status, 200);
}

TEST(ServeHttp, ApiKeyIsRequiredAndCheckedOnEveryRouteButHealth) {
  ServerOptions o;
  o.api_key = "k3y-0123456789abcdef";
  TestServer s(o);
  const json body = {{"prompt", "x"}, {"max_tokens", 1}};
  auto none = s.client();
  auto r = none->Post("/v1/completions", body.dump(), "application/json");
  ASSERT_TRUE(r);
  EXPECT_EQ(r->status, 401);
  EXPECT_EQ(json::parse(r->body)["error"]["code"], "missing_api_key");
  EXPECT_EQ(r->get_header_value("WWW-Authenticate"), "Bearer");
  EXPECT_EQ(none->Get("/v1/models")->status, 401);
  EXPECT_EQ(none->Get("/nowhere")->status, 401) << "unknown routes do not reveal themselves without a key";
  EXPECT_EQ(none->Get("/health")->status, 200);
  for (const std::string wrong : {"k3y-0123456789abcdeF", "k3y-0123456789abcde", "k3y-0123456789abcdef0", "x"}) {
    auto c = s.client(wrong);
    r = c->Post("/v1/completions", body.dump(), "application/json");
    ASSERT_TRUE(r);
    EXPECT_EQ(r->status, 401) << wrong;
    EXPECT_EQ(json::parse(r->body)["error"]["code"], "invalid_api_key");
  }
  auto ok = s.client(o.api_key);
  EXPECT_EQ(ok->Post("/v1/completions", body.dump(), "application/json")->status, 200);
  EXPECT_EQ(ok->Get("/v1/models")->status, 200);

  EXPECT_TRUE(api_key_matches("abc", "abc"));
  EXPECT_FALSE(api_key_matches("abc", "abd"));
  EXPECT_FALSE(api_key_matches("abc", ""));
}

TEST(ServeHttp, NonLoopbackBindWithoutAKeyIsRefused) {
  EXPECT_TRUE(is_loopback_host("127.0.0.1"));
  EXPECT_TRUE(is_loopback_host("127.8.9.10"));
  EXPECT_TRUE(is_loopback_host("::1"));
  EXPECT_TRUE(is_loopback_host("[::1]"));
  EXPECT_TRUE(is_loopback_host("localhost"));
  EXPECT_TRUE(is_loopback_host("::ffff:127.0.0.1"));
  for (const char* h : {"0.0.0.0", "::", "192.168.1.10", "10.0.0.1", "example.org", "128.0.0.1", ""})
    EXPECT_FALSE(is_loopback_host(h)) << h;
  ThreadPool pool(1);
  for (const char* h : {"0.0.0.0", "::", "192.168.1.10"}) {
    ServerOptions o;
    o.host = h;
    o.port = 0;
    Server server(*demo().model, *demo().tokenizer, pool, o);
    try {
      server.start();
      ADD_FAILURE() << "listened on " << h << " without a key";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("without an API key"), std::string::npos) << e.what();
    }
  }
  // The command refuses before loading anything.
  const auto r = test::run_cli({"serve", "--model", demo_model(), "--host", "0.0.0.0", "--port", "0"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_EQ(r.err.rfind("error: refusing to listen on 0.0.0.0", 0), 0u) << r.err;
}

TEST(ServeHttp, RequestTextIsNeverLoggedUnlessAskedFor) {
  const std::string secret = "PatientJaneDoe4711";
  for (const bool log_content : {false, true}) {
    ServerOptions o;
    o.log_content = log_content;
    TestServer s(o);
    auto c = s.client();
    post(*c, "/v1/chat/completions", {{"messages", {{{"role", "user"}, {"content", secret}}}}, {"max_tokens", 3}});
    post(*c, "/v1/completions", {{"prompt", secret}, {"max_tokens", 2}, {"bad_" + secret, 1}}, 400);
    post(*c, "/v1/bionlp/ner", {{"text", secret}, {"task", "ncbi-disease"}});
    c->Get("/" + secret);
    raw_http(s.port(), secret + " /v1/models HTTP/1.1\r\n\r\n");
    const std::string log = s.log();
    EXPECT_NE(log.find("POST /v1/chat/completions 200"), std::string::npos) << log;
    EXPECT_NE(log.find("prompt="), std::string::npos) << log;
    EXPECT_EQ(log.find(secret) != std::string::npos, log_content) << log;
  }
}

// Every token a scheduler streams for one request.
std::vector<int32_t> served_tokens(Scheduler& s, const GenerationRequest& r) {
  auto g = s.submit(r);
  std::vector<TokenOut> batch;
  std::vector<int32_t> ids;
  while (g->next(batch))
    for (const auto& t : batch) ids.push_back(t.id);
  return ids;
}

// A served prompt, prefilled in small chunks between other work, gives eval's greedy answer token
// for token even on quantized weights (chunks never shrink to the one-token kernel path).
TEST(ServeScheduler, ChunkedPrefillGivesEvalsAnswerOnQuantizedWeights) {
  auto model = Model::load(demo_model());
  ThreadPool pool(2), eval_pool(1);
  quantize_model(*model, plan_quantization(*model, parse_quant_recipe("q4_k")), pool);
  const std::string prompt = "TASK: name the drug class.\n\nSentence: Metformin and insulin lower blood glucose in type 2 "
                             "diabetes, while aspirin inhibits platelets.";
  eval::LocalBackend local(*model, *demo().tokenizer, eval_pool, true);
  const std::string want = local.generate(prompt, 40);
  for (int64_t chunk : {2, 5, 7, 256}) {
    SchedulerOptions o;
    o.prefill_chunk = chunk;
    o.extra_eos_ids = {*demo().tokenizer->eos_id()};
    Scheduler s(*model, pool, o);
    GenerationRequest r;
    r.prompt = local.encode_prompt(prompt);
    r.max_tokens = 40;
    r.sampling.temperature = 0.0f;
    EXPECT_EQ(demo().tokenizer->decode(served_tokens(s, r), true), want) << "prefill chunk " << chunk;
  }
}

// A longrope model's prompt past its original context, prefilled in chunks, rotates as one pass does
// (transformers' choice for the whole prompt): the fixture's HF greedy continuation, every chunk size.
TEST(ServeScheduler, ChunkedPrefillOfALongropePromptRotatesAsOnePass) {
  const std::string dir = test::fixtures_dir() + "/models/phi3longrope";
  const json ref = json::parse(test::read_file(dir + "/reference.json"));
  auto model = Model::load(dir + "/f32");
  ThreadPool pool(2);
  for (int64_t chunk : {2, 6, 256}) {
    SchedulerOptions o;
    o.prefill_chunk = chunk;
    Scheduler s(*model, pool, o);
    GenerationRequest r;
    r.prompt = ref["tokens"].get<std::vector<int32_t>>();
    r.max_tokens = 20;
    r.sampling.temperature = 0.0f;
    EXPECT_EQ(served_tokens(s, r), ref["f32"]["greedy"].get<std::vector<int32_t>>()) << "prefill chunk " << chunk;
  }
}

// eval's prompt cache and longrope: rows cached by a prompt within the original context are not
// reused by one past it (nor the other way), so each is rotated as transformers rotates it alone.
TEST(EvalBackend, LongropePromptsReuseOnlyRowsRotatedAlike) {
  test::TempDir dir;
  for (const auto& e : std::filesystem::directory_iterator(demo_model()))
    if (e.path().filename() != "config.json") std::filesystem::create_symlink(e.path(), dir.file(e.path().filename().string()));
  json config = json::parse(test::read_file(demo_model() + "/config.json"));
  json rope = {{"rope_type", "longrope"}, {"rope_theta", 10000.0}, {"original_max_position_embeddings", 16},
               {"short_factor", json::array()}, {"long_factor", json::array()}};
  for (int i = 0; i < 16; ++i) {
    rope["short_factor"].push_back(1.0);
    rope["long_factor"].push_back(1.0 + 0.5 * i);
  }
  config["rope_parameters"] = rope;
  test::write_file(dir.file("config.json"), config.dump());
  auto model = Model::load(dir.path());
  auto tokenizer = load_tokenizer(dir.path());
  ThreadPool pool(1);
  const std::string short_prompt = "Aspirin", long_prompt = "Aspirin induced asthma in adults with nasal polyps and "
                                                            "chronic rhinosinusitis was treated with a leukotriene receptor antagonist.";
  eval::LocalBackend a(*model, *tokenizer, pool, false), fresh(*model, *tokenizer, pool, false);
  ASSERT_LE(a.encode_prompt(short_prompt).size(), 16u);
  ASSERT_GT(a.encode_prompt(long_prompt).size(), 16u);
  a.generate(short_prompt, 2);
  int64_t reused = a.counters().prompt_tokens_reused;
  EXPECT_EQ(a.generate(long_prompt, 8), fresh.generate(long_prompt, 8));
  EXPECT_EQ(a.counters().prompt_tokens_reused, reused);  // the short prompt's rows: not for the long one
  EXPECT_EQ(a.generate(short_prompt + " induced", 2), fresh.generate(short_prompt + " induced", 2));
  EXPECT_EQ(a.counters().prompt_tokens_reused, reused);  // nor the long one's for a short one
  a.generate(short_prompt + " induced asthma", 2);
  EXPECT_GT(a.counters().prompt_tokens_reused, reused);  // two short prompts share rows as before
  reused = a.counters().prompt_tokens_reused;
  EXPECT_EQ(a.generate_batch({long_prompt, long_prompt + " Outcomes"}, 4),
            (std::vector<std::string>{fresh.generate(long_prompt, 4), fresh.generate(long_prompt + " Outcomes", 4)}));
  EXPECT_EQ(a.counters().prompt_tokens_reused, reused);  // a batch past the context shares no prefix pass
}

TEST(ServeHttp, DeadlinesAnswer503) {
  ServerOptions o;
  o.timeout_seconds = 0.001;
  TestServer s(o);
  auto c = s.client();
  json e = post(*c, "/v1/completions", {{"prompt", "The"}, {"max_tokens", 500}, {"temperature", 1.0}}, 503);
  EXPECT_EQ(e["error"]["code"], "deadline_exceeded");
}

TEST(ServeScheduler, LengthContextCancelDeadlineBusyShutdown) {
  ThreadPool pool(1);
  SchedulerOptions o;
  o.max_batch = 2;
  o.max_pending = 2;
  o.context = 32;
  Scheduler s(*demo().model, pool, o);
  GenerationRequest r;
  r.prompt = {1, 5, 9};
  r.max_tokens = 1000;
  r.stop_at_eos = false;
  r.sampling.temperature = 0.0f;
  auto drain = [](Generation& g) {
    std::vector<TokenOut> all, batch;
    while (g.next(batch)) all.insert(all.end(), batch.begin(), batch.end());
    return all;
  };
  auto a = s.submit(r);
  auto b = s.submit(r);
  EXPECT_THROW(s.submit(r), Busy);
  b->cancel();
  // The context ends `a`: every position holds a prompt token or a fed answer token.
  EXPECT_EQ(drain(*a).size(), 32u - 3u + 1u);
  EXPECT_EQ(a->finish(), Finish::length);
  drain(*b);
  EXPECT_EQ(b->finish(), Finish::cancelled);
  r.max_tokens = 4;
  r.logprobs = 2;
  auto c = s.submit(r);
  const auto tokens = drain(*c);
  ASSERT_EQ(tokens.size(), 4u);
  EXPECT_EQ(c->finish(), Finish::length);
  EXPECT_EQ(tokens[0].top.size(), 2u);
  EXPECT_EQ(tokens[0].top[0].first, tokens[0].id);  // greedy picks the most likely
  r.deadline = Clock::now() - std::chrono::seconds(1);
  auto d = s.submit(r);
  drain(*d);
  EXPECT_EQ(d->finish(), Finish::deadline);
  r.deadline = Clock::time_point::max();
  r.prompt.assign(32, 1);
  EXPECT_THROW(s.submit(r), Error);  // no room for an answer
  r.prompt.clear();
  EXPECT_THROW(s.submit(r), Error);
  r.prompt = {1, 5, 9};
  r.max_tokens = 1000;
  auto e = s.submit(r);
  s.shutdown();
  drain(*e);
  EXPECT_TRUE(e->finish() == Finish::shutdown || e->finish() == Finish::length);
  EXPECT_THROW(s.submit(r), Busy);
}

TEST(ServeHttp, ShutdownEndsStreamsCleanly) {
  auto s = std::make_unique<TestServer>();
  std::atomic<bool> started{false};
  std::string body;
  std::thread t([&] {
    auto c = s->client();
    httplib::Request req;
    req.method = "POST";
    req.path = "/v1/chat/completions";
    req.body = json{{"messages", {{{"role", "user"}, {"content", "Go"}}}}, {"max_tokens", 1000}, {"temperature", 1.0},
                    {"seed", 5}, {"stream", true}}
                   .dump();
    req.set_header("Content-Type", "application/json");
    req.content_receiver = [&](const char* data, size_t n, uint64_t, uint64_t) {
      body.append(data, n);
      started = true;
      return true;
    };
    httplib::Response res;
    httplib::Error err = httplib::Error::Success;
    c->send(req, res, err);
  });
  while (!started) std::this_thread::sleep_for(std::chrono::milliseconds(2));
  s->server().shutdown(std::chrono::milliseconds(0));
  t.join();
  const auto events = sse_events(body);
  ASSERT_GE(events.size(), 2u);
  EXPECT_EQ(events.back(), "[DONE]");
  const json last = json::parse(events[events.size() - 2]);
  // Either it finished just in time, or it was ended with an error event.
  if (last.contains("error")) {
    EXPECT_EQ(last["error"]["code"], "shutting_down");
  }
}

// Malformed requests of every kind: all refused with 4xx JSON, none crash the server.
TEST(ServeHttp, ShortFuzzLeavesTheServerUp) {
  ServerOptions o;
  o.max_body_bytes = 16384;
  o.limits.max_tokens_cap = 8;
  TestServer s(o);
  auto c = s.client();
  std::mt19937 rng(1234);
  const std::vector<std::string> seeds = {
      R"({"prompt": "x", "max_tokens": 2})",
      R"({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stop": ["a"]})",
      R"({"text": "aspirin", "task": "bc5cdr-chem"})",
      R"({"question": "q", "options": {"A": "a", "B": "b"}})"};
  const std::vector<std::string> paths = {"/v1/completions", "/v1/chat/completions", "/v1/bionlp/ner", "/v1/bionlp/qa"};
  int ok = 0, refused = 0;
  for (int i = 0; i < 300; ++i) {
    const size_t k = rng() % seeds.size();
    std::string body = seeds[k];
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      const size_t at = rng() % (body.size() + 1);
      switch (rng() % 4) {
        case 0: body.insert(at, 1, "{}[]\",:0-e\\\x80\xff"[rng() % 14]); break;
        case 1: if (at < body.size()) body.erase(at, 1); break;
        case 2: if (at < body.size()) body[at] = static_cast<char>(rng() % 256); break;
        case 3: body = body.substr(0, at); break;
      }
    }
    auto r = c->Post(paths[k], body, "application/json");
    ASSERT_TRUE(r) << "request " << i << " got no answer";
    ASSERT_TRUE(r->status == 200 || (r->status >= 400 && r->status < 500)) << r->status << " for " << body;
    const json j = json::parse(r->body);
    if (r->status == 200) ++ok;
    else {
      ++refused;
      EXPECT_TRUE(j.contains("error")) << r->body;
    }
  }
  EXPECT_GT(refused, 150);
  EXPECT_EQ(c->Get("/health")->status, 200);
}

// ---------------------------------------------------------------------------------------------
// The command: `bioquant serve` as a process, and eval against it

// `bioquant serve ARGS` in the background; the port is read from its "serving ... on URL" line.
class ServeProcess {
 public:
  explicit ServeProcess(const std::vector<std::string>& args) {
    err_path_ = dir_.file("serve.err");
    pid_ = ::fork();
    if (pid_ == 0) {
      std::vector<std::string> all = {BIOQUANT_CLI, "serve"};
      all.insert(all.end(), args.begin(), args.end());
      std::vector<char*> argv;
      for (auto& a : all) argv.push_back(a.data());
      argv.push_back(nullptr);
      std::FILE* err = std::freopen(err_path_.c_str(), "w", stderr);
      (void)err;
      ::execv(BIOQUANT_CLI, argv.data());
      ::_exit(127);
    }
    for (int i = 0; i < 3000 && port_ == 0; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
      const std::string err = test::read_file(err_path_);
      const size_t at = err.find("serving ");
      const size_t url = err.find("http://127.0.0.1:", at == std::string::npos ? 0 : at);
      if (at != std::string::npos && url != std::string::npos) port_ = std::atoi(err.c_str() + url + 17);
      int status = 0;
      if (::waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        break;
      }
    }
  }
  ~ServeProcess() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }
  int port() const { return port_; }
  // SIGTERM; the exit status.
  int stop() {
    ::kill(pid_, SIGTERM);
    int status = 0;
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  }
  std::string err() const { return test::read_file(err_path_); }

 private:
  test::TempDir dir_;
  std::string err_path_;
  pid_t pid_ = -1;
  int port_ = 0;
};

std::vector<json> read_lines(const std::string& path) {
  std::vector<json> out;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line))
    if (!line.empty()) out.push_back(json::parse(line));
  return out;
}

TEST(ServeCli, EvalAgainstTheServerScoresLikeInProcessEval) {
  if (data_dir().empty()) GTEST_SKIP() << "../shared/bionlp not present";
  ServeProcess server({"--model", demo_model(), "--port", "0", "--threads", "2"});
  ASSERT_GT(server.port(), 0) << server.err();
  test::TempDir dir;
  const std::string tasks = "bc5cdr-chem,chemprot,pubmedqa";
  const std::vector<std::string> common = {"--tasks", tasks, "--limit", "3", "--data-dir", data_dir(), "--no-db", "--quiet"};
  std::vector<std::string> local = {"eval", "--model", demo_model(), "--out", dir.file("local"), "--threads", "2"};
  std::vector<std::string> remote = {"eval", "--backend", "openai", "--endpoint",
                                     "http://127.0.0.1:" + std::to_string(server.port()) + "/v1", "--out", dir.file("remote")};
  local.insert(local.end(), common.begin(), common.end());
  remote.insert(remote.end(), common.begin(), common.end());
  auto r = test::run_cli(local);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = test::run_cli(remote);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const json a = json::parse(test::read_file(dir.file("local/results.json")))["tasks"];
  const json b = json::parse(test::read_file(dir.file("remote/results.json")))["tasks"];
  for (const char* task : {"bc5cdr-chem", "chemprot", "pubmedqa"}) {
    SCOPED_TRACE(task);
    EXPECT_EQ(a[task]["score"], b[task]["score"]);
    EXPECT_EQ(a[task]["ci95"], b[task]["ci95"]);
    EXPECT_EQ(a[task]["unparsed"], b[task]["unparsed"]);
    const auto la = read_lines(dir.file(std::string("local/samples/") + task + ".jsonl"));
    const auto lb = read_lines(dir.file(std::string("remote/samples/") + task + ".jsonl"));
    ASSERT_EQ(la.size(), 3u);
    ASSERT_EQ(lb.size(), 3u);
    for (size_t i = 0; i < 3; ++i) {
      EXPECT_EQ(la[i]["id"], lb[i]["id"]);
      EXPECT_EQ(la[i]["prompt"], lb[i]["prompt"]);
      EXPECT_EQ(la[i]["output"], lb[i]["output"]) << "example " << la[i]["id"];
      EXPECT_EQ(la[i]["parsed"], lb[i]["parsed"]);
      EXPECT_EQ(la[i]["correct"], lb[i]["correct"]);
    }
  }
  // SIGTERM: a clean exit with its summary.
  EXPECT_EQ(server.stop(), 0) << server.err();
  const std::string err = server.err();
  EXPECT_NE(err.find("SIGTERM: shutting down"), std::string::npos) << err;
  EXPECT_NE(err.find("POST /v1/chat/completions 200"), std::string::npos) << err;
  EXPECT_EQ(err.find("Sentence:"), std::string::npos) << "prompt text in the log";
}

TEST(ServeCli, ApiKeyFileAndSignals) {
  test::TempDir dir;
  test::write_file(dir.file("short"), "abc\n");
  auto r = test::run_cli({"serve", "--model", demo_model(), "--api-key-file", dir.file("short"), "--port", "0"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("shorter than 16"), std::string::npos) << r.err;
  test::write_file(dir.file("key"), "  s3cret-s3cret-s3cret-s3cret\n");
  ::chmod(dir.file("key").c_str(), 0600);
  ServeProcess server({"--model", demo_model(), "--port", "0", "--threads", "1", "--api-key-file", dir.file("key")});
  ASSERT_GT(server.port(), 0) << server.err();
  httplib::Client c("127.0.0.1", server.port());
  EXPECT_EQ(c.Get("/v1/models")->status, 401);
  c.set_bearer_token_auth("s3cret-s3cret-s3cret-s3cret");
  EXPECT_EQ(c.Get("/v1/models")->status, 200);
  EXPECT_EQ(server.stop(), 0) << server.err();
  EXPECT_NE(server.err().find("API key required"), std::string::npos) << server.err();
}

}  // namespace
}  // namespace bioquant::serve
