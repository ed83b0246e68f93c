// Where answers come from: a model run here (LocalBackend) or any OpenAI-compatible server
// (OpenAIBackend). The runner asks for free text (the study's mode) or, locally, for an answer
// assembled from fixed text and choices (constrained decoding, log-likelihood choice).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "bioquant/core/thread_pool.h"
#include "bioquant/model/decoder.h"

namespace bioquant {
class Tokenizer;
}

namespace bioquant::eval {

enum class ScoringMode { generate, constrained, loglik };
ScoringMode parse_scoring_mode(const std::string& name);  // generate | constrained | loglik
const char* scoring_mode_name(ScoringMode mode);

// Part of an answer: fixed text the model is fed, or a choice among strings.
struct AnswerSegment {
  std::string fixed;                 // used when choices is empty
  std::vector<std::string> choices;  // non-empty: one of them is chosen
};

struct BackendCounters {
  int64_t prompts = 0;
  int64_t prompt_tokens_computed = 0;  // prompt tokens run through the model
  int64_t prompt_tokens_reused = 0;    // prompt tokens whose KV cache was reused from the previous prompt
  int64_t generated_tokens = 0;        // tokens produced or scored after the prompt
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string describe() const = 0;
  // Free-text answer to `prompt` (the user's message; a chat template, if any, is applied here).
  virtual std::string generate(const std::string& prompt, int max_new_tokens) = 0;
  // generate() of each prompt, in order; a backend may run them together (this one: one by one).
  virtual std::vector<std::string> generate_batch(const std::vector<std::string>& prompts, int max_new_tokens);
  // Whether choose() works (local models only).
  virtual bool can_choose() const { return false; }
  // The answer text built segment by segment: fixed text is fed as is; at a choice, `constrained`
  // decodes greedily with the next token restricted to those that continue some choice (a token
  // trie), `loglik` picks the choice of highest total log-probability. Earlier choices condition
  // later ones.
  virtual std::string choose(const std::string& prompt, const std::vector<AnswerSegment>& plan, ScoringMode mode);

  const BackendCounters& counters() const { return counters_; }
  // Highest GPU memory this backend's model has held (our allocations), 0 when it runs elsewhere.
  virtual size_t gpu_peak_bytes() const { return 0; }
  // The GPU's own peak use while it ran (cudaMemGetInfo: the CUDA context and cuBLAS included): what a
  // card needs for this run. 0 when it runs elsewhere.
  virtual size_t gpu_device_peak_bytes() const { return 0; }

 protected:
  BackendCounters counters_;
};

// A prompt as the local backend feeds it: wrapped in the tokenizer's chat template as a single user
// turn with the generation prompt (when `chat` and the tokenizer has a template), else encoded with
// the tokenizer's BOS/EOS rules. Servers and training-data tools use this to match eval exactly.
std::vector<int32_t> encode_prompt_text(const Tokenizer& tokenizer, const std::string& prompt, bool chat);

// A model in this process. Consecutive prompts reuse the KV cache of their longest common token
// prefix (the instruction and few-shot examples shared by every example are computed once).
class LocalBackend : public Backend {
 public:
  // use_chat_template: wrap prompts in the tokenizer's chat template when it has one.
  // device: -1 CPU, N CUDA device N.
  // exact: exact numerics (Decoder's): the same answers on the CPU and on any GPU.
  LocalBackend(const Model& model, const Tokenizer& tokenizer, ThreadPool& pool, bool use_chat_template, int device = -1,
               KvType kv = KvType::BF16, bool exact = false);
  ~LocalBackend() override;

  std::string describe() const override;
  std::string generate(const std::string& prompt, int max_new_tokens) override;
  // The prompts decoded together (Decoder::forward_batch): their longest common token prefix is
  // computed once (or reused from the previous prompts) and copied into each sequence's KV cache,
  // the rest of every prompt goes through in one pass, then each step decodes one token of every
  // sequence still running, reading the weights once for all. Greedy and EOS as generate(). With
  // 16/32-bit weights on the CPU the answers are generate()'s to the bit; quantized weights (whose
  // one-token kernels sum in another order than the many-token ones) and GPUs (tensor cores for
  // long batches) round differently, so an answer may differ where two tokens nearly tie.
  std::vector<std::string> generate_batch(const std::vector<std::string>& prompts, int max_new_tokens) override;
  // Whether a prompt of this many tokens may start from rows computed before it. For a longrope model,
  // not when it or the cached prompt reaches past the original context: transformers rotates a whole
  // prompt with the factors its length calls for, and the cached rows may hold the others.
  bool may_reuse_rows(size_t prompt_tokens) const;
  bool can_choose() const override { return true; }
  std::string choose(const std::string& prompt, const std::vector<AnswerSegment>& plan, ScoringMode mode) override;

  bool applies_chat_template() const { return chat_; }
  size_t gpu_peak_bytes() const override;
  size_t gpu_device_peak_bytes() const override;
  const Decoder& decoder() const { return decoder_; }
  std::vector<int32_t> encode_prompt(const std::string& prompt) const;

 private:
  // Prefill with prefix reuse, then extend the sequence: logits_ = the next-token logits, or with `top`,
  // only the greedy next token there (logits_ left as they were; on a GPU no logits come back).
  void start(const std::vector<int32_t>& prompt, int32_t* top = nullptr);
  void feed(const std::vector<int32_t>& ids, int32_t* top = nullptr);
  void run(const std::vector<int32_t>& ids, int32_t* top);  // one pass over ids appended to cache_
  void ensure_capacity(int64_t tokens);
  // Truncates cache_ and sequence_ to their longest common prefix with tokens[0, limit), in a cache of
  // at least `capacity` positions; returns that prefix's length.
  size_t keep_cached_prefix(const std::vector<int32_t>& tokens, size_t limit, int64_t capacity);
  void warn_context(int64_t tokens);  // once, when a prompt plus its answer passes the trained context
  bool is_eos(int32_t id) const;

  const Model& model_;
  bool cached_rows_long_ = false;  // longrope: cache_'s prompt rows were rotated with the long factors
  const Tokenizer& tokenizer_;
  Decoder decoder_;
  bool chat_ = false;
  std::string chat_template_;
  std::unique_ptr<KVCache> cache_;
  std::vector<int32_t> sequence_;  // tokens in the cache, in order
  std::vector<std::unique_ptr<KVCache>> batch_caches_;  // generate_batch's sequences, kept for the next batch
  HostFloats logits_;  // next-token logits after sequence_ (page-locked on a GPU: see HostFloats)
  bool warned_context_ = false;
};

}  // namespace bioquant::eval
