#include "bioquant/eval/backend.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <span>

#include "bioquant/core/error.h"
#include "bioquant/kernels/cpu/ops.h"
#include "bioquant/tokenizer/chat_template.h"
#include "bioquant/tokenizer/tokenizer.h"

namespace bioquant::eval {

ScoringMode parse_scoring_mode(const std::string& name) {
  if (name == "generate") return ScoringMode::generate;
  if (name == "constrained") return ScoringMode::constrained;
  if (name == "loglik") return ScoringMode::loglik;
  throw Error("unknown scoring mode \"" + name + "\" (expected generate, constrained or loglik)");
}

const char* scoring_mode_name(ScoringMode mode) {
  switch (mode) {
    case ScoringMode::generate: return "generate";
    case ScoringMode::constrained: return "constrained";
    case ScoringMode::loglik: return "loglik";
  }
  return "?";
}

std::string Backend::choose(const std::string&, const std::vector<AnswerSegment>&, ScoringMode mode) {
  throw Error(describe() + " only generates text; scoring mode " + scoring_mode_name(mode) +
              " needs a local model (--model)");
}

LocalBackend::LocalBackend(const Model& model, const Tokenizer& tokenizer, ThreadPool& pool, bool use_chat_template,
                           int device, KvType kv, bool exact)
    : model_(model), tokenizer_(tokenizer), decoder_(model, pool, device, kv, exact) {
  chat_ = use_chat_template && !tokenizer.chat_template().empty();
  chat_template_ = tokenizer.chat_template();
  logits_ = HostFloats(static_cast<size_t>(model.config().vocab), decoder_.gpu() != nullptr);
}

LocalBackend::~LocalBackend() = default;

size_t LocalBackend::gpu_peak_bytes() const { return decoder_.gpu() ? decoder_.gpu()->memory().peak_allocated : 0; }
size_t LocalBackend::gpu_device_peak_bytes() const {
  return decoder_.gpu() ? decoder_.gpu()->memory().device_used_peak : 0;
}

std::string LocalBackend::describe() const {
  return std::string("local model (") + (chat_ ? "chat template" : "plain prompt") + ")";
}

std::vector<int32_t> encode_prompt_text(const Tokenizer& tokenizer, const std::string& prompt, bool chat) {
  if (!chat || tokenizer.chat_template().empty()) return tokenizer.encode(prompt, /*add_special=*/true);
  const ChatTemplate tmpl(tokenizer.chat_template());
  const std::string rendered = tmpl.render({{"user", prompt}}, true, tokenizer.bos_token(), tokenizer.eos_token());
  // As transformers does: the template writes BOS itself; special-token text in it is recognised.
  return tokenizer.encode(rendered, /*add_special=*/false, /*parse_special=*/true);
}

std::vector<int32_t> LocalBackend::encode_prompt(const std::string& prompt) const {
  return encode_prompt_text(tokenizer_, prompt, chat_);
}

bool LocalBackend::is_eos(int32_t id) const {
  const auto& eos = model_.config().eos_ids;
  return std::find(eos.begin(), eos.end(), id) != eos.end() || (tokenizer_.eos_id() && *tokenizer_.eos_id() == id);
}

void LocalBackend::warn_context(int64_t tokens) {
  const int64_t trained = model_.config().max_positions;
  if (!warned_context_ && trained > 0 && tokens > trained) {
    std::fprintf(stderr, "warning: a prompt plus its answer needs %lld positions, more than the model's %lld; "
                 "answers past that point are unreliable\n", static_cast<long long>(tokens),
                 static_cast<long long>(trained));
    warned_context_ = true;
  }
}

void LocalBackend::ensure_capacity(int64_t tokens) {
  warn_context(tokens);
  if (cache_ && cache_->capacity() >= tokens) return;
  // Grow geometrically; the sequence held so far is recomputed into the new cache (rare).
  int64_t capacity = std::max<int64_t>(tokens, 512);
  if (cache_) capacity = std::max(capacity, cache_->capacity() * 2);
  cache_ = std::make_unique<KVCache>(model_.config(), capacity);
  if (!sequence_.empty())
    decoder_.forward(sequence_.data(), static_cast<int64_t>(sequence_.size()), *cache_, 1, logits_.data());
}

size_t LocalBackend::keep_cached_prefix(const std::vector<int32_t>& tokens, size_t limit, int64_t capacity) {
  // A cache too small is replaced; what it held is not worth recomputing into the new one.
  if (!cache_ || cache_->capacity() < capacity) sequence_.clear();
  if (!may_reuse_rows(tokens.size())) limit = 0;
  // The caller computes the rest of `tokens` in one step: the rows' factors are that step's.
  cached_rows_long_ = rope_long_step(model_.config().rope, static_cast<int64_t>(tokens.size()) - 1);
  ensure_capacity(capacity);
  size_t common = 0;
  const size_t n = std::min(sequence_.size(), limit);
  while (common < n && sequence_[common] == tokens[common]) ++common;
  cache_->truncate(static_cast<int64_t>(common));
  sequence_.resize(common);
  return common;
}

bool LocalBackend::may_reuse_rows(size_t prompt_tokens) const {
  const RopeParams& rope = model_.config().rope;
  return rope.type != RopeType::LongRope ||
         (!rope_long_step(rope, static_cast<int64_t>(prompt_tokens) - 1) && !cached_rows_long_);
}

void LocalBackend::run(const std::vector<int32_t>& ids, int32_t* top) {
  const DecodeSegment segment{ids.data(), static_cast<int64_t>(ids.size()), cache_.get(), 1, top ? nullptr : logits_.data(), top};
  decoder_.forward_batch(std::span<const DecodeSegment>(&segment, 1));
}

void LocalBackend::start(const std::vector<int32_t>& prompt, int32_t* top) {
  check(!prompt.empty(), "the prompt encodes to no tokens");
  // Keeps at least the last prompt token to run (its logits are the first answer token's distribution).
  const size_t common = keep_cached_prefix(prompt, prompt.size() - 1, static_cast<int64_t>(prompt.size()) + 1);
  counters_.prompts += 1;
  counters_.prompt_tokens_reused += static_cast<int64_t>(common);
  counters_.prompt_tokens_computed += static_cast<int64_t>(prompt.size() - common);
  const std::vector<int32_t> rest(prompt.begin() + static_cast<std::ptrdiff_t>(common), prompt.end());
  run(rest, top);
  sequence_.insert(sequence_.end(), rest.begin(), rest.end());
}

void LocalBackend::feed(const std::vector<int32_t>& ids, int32_t* top) {
  if (ids.empty()) return;
  ensure_capacity(static_cast<int64_t>(sequence_.size() + ids.size()) + 1);
  check(cache_->size() == static_cast<int64_t>(sequence_.size()), "internal: KV cache out of step");
  run(ids, top);
  sequence_.insert(sequence_.end(), ids.begin(), ids.end());
}

std::string LocalBackend::generate(const std::string& prompt, int max_new_tokens) {
  // Greedy: each pass hands back its top token only (see start).
  int32_t next = -1;
  start(encode_prompt(prompt), &next);
  std::vector<int32_t> out;
  for (int i = 0; i < max_new_tokens; ++i) {
    if (is_eos(next)) break;
    out.push_back(next);
    counters_.generated_tokens += 1;
    if (i + 1 < max_new_tokens) feed({next}, &next);
  }
  return tokenizer_.decode(out, /*skip_special=*/true);
}

std::vector<std::string> Backend::generate_batch(const std::vector<std::string>& prompts, int max_new_tokens) {
  std::vector<std::string> out;
  out.reserve(prompts.size());
  for (const std::string& p : prompts) out.push_back(generate(p, max_new_tokens));
  return out;
}

std::vector<std::string> LocalBackend::generate_batch(const std::vector<std::string>& prompts, int max_new_tokens) {
  if (prompts.size() <= 1) return Backend::generate_batch(prompts, max_new_tokens);
  const size_t batch = prompts.size();
  std::vector<std::vector<int32_t>> ids;
  size_t shortest = std::numeric_limits<size_t>::max(), longest = 0;
  for (const std::string& p : prompts) {
    ids.push_back(encode_prompt(p));
    check(!ids.back().empty(), "the prompt encodes to no tokens");
    shortest = std::min(shortest, ids.back().size());
    longest = std::max(longest, ids.back().size());
  }
  const int64_t budget = std::max(max_new_tokens, 0);
  // The prefix every prompt shares, less at least its last token (whose logits each sequence needs).
  size_t prefix = 0;
  bool reuse = true;
  for (const auto& v : ids) reuse = reuse && may_reuse_rows(v.size());
  while (reuse && prefix + 1 < shortest &&
         std::all_of(ids.begin(), ids.end(), [&](const auto& v) { return v[prefix] == ids[0][prefix]; }))
    ++prefix;

  // The shared prefix in cache_ (reusing what it holds of it), as start() does for one prompt.
  warn_context(static_cast<int64_t>(longest) + 1);
  const size_t common = keep_cached_prefix(ids[0], prefix, static_cast<int64_t>(prefix) + 1);
  if (prefix > common) {
    decoder_.forward(ids[0].data() + common, static_cast<int64_t>(prefix - common), *cache_, 0, nullptr);
    sequence_.insert(sequence_.end(), ids[0].begin() + static_cast<std::ptrdiff_t>(common),
                     ids[0].begin() + static_cast<std::ptrdiff_t>(prefix));
  }
  int64_t total = 0;
  for (const auto& v : ids) total += static_cast<int64_t>(v.size());
  const int64_t computed = static_cast<int64_t>(prefix - common) + total - static_cast<int64_t>(batch * prefix);
  counters_.prompts += static_cast<int64_t>(batch);
  counters_.prompt_tokens_computed += computed;
  counters_.prompt_tokens_reused += total - computed;

  // Each sequence's cache: the prefix copied in, then the rest of its prompt, all in one pass.
  const int64_t capacity = std::max<int64_t>(static_cast<int64_t>(longest) + budget + 1, 512);
  if (batch_caches_.size() < batch) batch_caches_.resize(batch);
  // Greedy: each step hands back the sequences' top tokens only (on a GPU, computed there: no logits
  // come back).
  std::vector<int32_t> next(batch), fed(batch);
  std::vector<DecodeSegment> segments;
  for (size_t i = 0; i < batch; ++i) {
    auto& cache = batch_caches_[i];
    if (!cache || cache->capacity() < static_cast<int64_t>(ids[i].size()) + budget + 1)
      cache = std::make_unique<KVCache>(model_.config(), std::max(capacity, cache ? 2 * cache->capacity() : 0));
    decoder_.copy_prefix(*cache_, *cache, static_cast<int64_t>(prefix));
    segments.push_back({ids[i].data() + prefix, static_cast<int64_t>(ids[i].size() - prefix), cache.get(), 1, nullptr, &next[i]});
  }
  decoder_.forward_batch(segments);

  // Decode: every running sequence's next token together, as generate()'s loop does one at a time.
  std::vector<std::vector<int32_t>> out(batch);
  std::vector<size_t> running(batch);
  for (size_t i = 0; i < batch; ++i) running[i] = i;
  for (int64_t step = 0; step < budget && !running.empty(); ++step) {
    segments.clear();
    std::vector<size_t> still;
    for (size_t i : running) {
      if (is_eos(next[i])) continue;
      out[i].push_back(next[i]);
      counters_.generated_tokens += 1;
      if (step + 1 < budget) {
        warn_context(static_cast<int64_t>(ids[i].size() + out[i].size()) + 1);
        still.push_back(i);
        fed[i] = next[i];
        segments.push_back({&fed[i], 1, batch_caches_[i].get(), 1, nullptr, &next[i]});
      }
    }
    if (!segments.empty()) decoder_.forward_batch(segments);
    running = std::move(still);
  }
  std::vector<std::string> texts;
  texts.reserve(batch);
  for (const auto& o : out) texts.push_back(tokenizer_.decode(o, /*skip_special=*/true));
  return texts;
}

namespace {

double log_softmax_at(std::span<const float> logits, int32_t id) {
  float max = -std::numeric_limits<float>::infinity();
  for (float v : logits) max = std::max(max, v);
  double sum = 0;
  for (float v : logits) sum += std::exp(static_cast<double>(v - max));
  return static_cast<double>(logits[static_cast<size_t>(id)] - max) - std::log(sum);
}

}  // namespace

std::string LocalBackend::choose(const std::string& prompt, const std::vector<AnswerSegment>& plan, ScoringMode mode) {
  check(mode != ScoringMode::generate, "internal: choose() with scoring mode generate");
  start(encode_prompt(prompt));
  std::string answer;
  for (const AnswerSegment& seg : plan) {
    if (seg.choices.empty()) {
      const auto ids = tokenizer_.encode(seg.fixed, false, false);
      feed(ids);
      counters_.generated_tokens += static_cast<int64_t>(ids.size());
      answer += seg.fixed;
      continue;
    }
    std::vector<std::vector<int32_t>> cand;
    for (const auto& c : seg.choices) {
      cand.push_back(tokenizer_.encode(c, false, false));
      check(!cand.back().empty(), "internal: an answer choice encodes to no tokens");
    }
    size_t chosen = 0;
    if (mode == ScoringMode::loglik) {
      // Sum of log-probabilities of each choice's tokens after the shared context (unnormalised by
      // length, as lm-evaluation-harness's acc). The context is rerun from the cache per choice.
      size_t longest = 0;
      for (const auto& c : cand) longest = std::max(longest, c.size());
      ensure_capacity(static_cast<int64_t>(sequence_.size() + longest) + 1);
      const size_t base = sequence_.size(), vocab = logits_.size();
      double best = -std::numeric_limits<double>::infinity();
      // Each choice's rows land here (page-locked on a GPU, as logits_); its first token's row is logits_.
      HostFloats rows(longest * vocab, decoder_.gpu() != nullptr);
      for (size_t c = 0; c < cand.size(); ++c) {
        double lp = log_softmax_at({logits_.data(), vocab}, cand[c][0]);
        if (cand[c].size() > 1) {
          const int64_t n = static_cast<int64_t>(cand[c].size());
          decoder_.forward(cand[c].data(), n, *cache_, n, rows.data());
          cache_->truncate(static_cast<int64_t>(base));
          for (size_t t = 1; t < cand[c].size(); ++t)
            lp += log_softmax_at({rows.data() + (t - 1) * vocab, vocab}, cand[c][t]);
        }
        if (lp > best) best = lp, chosen = c;
      }
      feed(cand[chosen]);
    } else {
      // Greedy over the token trie of the choices: at each step only tokens that continue a still
      // possible choice compete. A choice that is complete while longer ones continue wins when the
      // model prefers ending (EOS) over every continuing token.
      std::vector<size_t> alive(cand.size());
      for (size_t c = 0; c < cand.size(); ++c) alive[c] = c;
      size_t step = 0;
      while (true) {
        std::vector<size_t> complete;
        for (size_t c : alive)
          if (cand[c].size() == step) complete.push_back(c);
        if (complete.size() == alive.size()) {
          chosen = complete.front();
          break;
        }
        int32_t best_id = -1;
        float best_logit = -std::numeric_limits<float>::infinity();
        for (size_t c : alive)
          if (cand[c].size() > step && logits_[static_cast<size_t>(cand[c][step])] > best_logit)
            best_logit = logits_[static_cast<size_t>(cand[c][step])], best_id = cand[c][step];
        if (!complete.empty()) {
          float end_logit = -std::numeric_limits<float>::infinity();
          for (int32_t e : model_.config().eos_ids) end_logit = std::max(end_logit, logits_[static_cast<size_t>(e)]);
          if (end_logit >= best_logit) {
            chosen = complete.front();
            break;
          }
        }
        std::vector<size_t> next;
        for (size_t c : alive)
          if (cand[c].size() > step && cand[c][step] == best_id) next.push_back(c);
        alive = std::move(next);
        feed({best_id});
        ++step;
      }
    }
    counters_.generated_tokens += static_cast<int64_t>(cand[chosen].size());
    answer += seg.choices[chosen];
  }
  return answer;
}

}  // namespace bioquant::eval
