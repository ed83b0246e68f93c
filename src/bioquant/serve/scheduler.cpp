#include "bioquant/serve/scheduler.h"

#include <algorithm>
#include <cmath>
#include <exception>
#include <numeric>

#include "bioquant/kernels/cpu/ops.h"
#include "bioquant/kernels/cuda/gpu_decoder.h"

namespace bioquant::serve {

const char* finish_name(Finish f) {
  switch (f) {
    case Finish::running: return "running";
    case Finish::eos: return "eos";
    case Finish::length: return "length";
    case Finish::cancelled: return "cancelled";
    case Finish::deadline: return "deadline";
    case Finish::shutdown: return "shutdown";
    case Finish::error: return "error";
  }
  return "?";
}

bool Generation::next(std::vector<TokenOut>& out) {
  out.clear();
  std::unique_lock<std::mutex> lock(mutex_);
  ++token_waiters_;
  ready_.wait(lock, [&] { return !pending_.empty() || finish_ != Finish::running; });
  --token_waiters_;
  out.swap(pending_);
  return !out.empty() || finish_ == Finish::running;
}

std::vector<TokenOut> Generation::wait_end() {
  std::unique_lock<std::mutex> lock(mutex_);
  ready_.wait(lock, [&] { return finish_ != Finish::running; });
  return std::move(pending_);
}

Finish Generation::finish() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return finish_;
}

std::string Generation::error() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return error_;
}

void Generation::push(TokenOut token) {
  bool wake = false;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    pending_.push_back(std::move(token));
    wake = token_waiters_ > 0;
  }
  if (wake) ready_.notify_all();
}

void Generation::end(Finish finish, std::string error) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (finish_ != Finish::running) return;
    finish_ = finish;
    error_ = std::move(error);
  }
  ready_.notify_all();
}

// A sequence the scheduler holds: its request, KV cache, sampler and progress.
struct Scheduler::Sequence {
  std::shared_ptr<Generation> gen;
  GenerationRequest req;
  Sampler sampler;
  std::unique_ptr<KVCache> cache;
  HostFloats logits;  // page-locked on a GPU (see HostFloats); none when greedy()
  int32_t top = -1;   // greedy(): the step's top token (computed where the decoder runs)
  int64_t prefilled = 0;  // prompt tokens in the cache
  int64_t generated = 0;  // tokens handed out
  int32_t last = -1;      // the token to feed at the next step

  Sequence(std::shared_ptr<Generation> g, GenerationRequest r)
      : gen(std::move(g)), req(std::move(r)), sampler(req.sampling) {}
  bool prefilling() const { return prefilled < static_cast<int64_t>(req.prompt.size()); }
  // Temperature 0 without log-probabilities: the top token is all a step needs to hand back.
  bool greedy() const { return req.sampling.temperature == 0.0f && req.logprobs < 0; }
};

Scheduler::Scheduler(const Model& model, ThreadPool& pool, SchedulerOptions options)
    : model_(model), pool_(pool), decoder_(model, pool, options.device, options.kv, options.exact), options_(options) {
  check(options_.max_batch >= 1, "max batch must be at least 1");
  check(options_.max_pending >= options_.max_batch, "the request queue must hold at least one batch");
  check(options_.prefill_chunk >= 2, "prefill chunk must be at least 2 tokens");
  const int64_t trained = model.config().max_positions;
  context_ = options_.context > 0 ? options_.context : (trained > 0 ? trained : 4096);
  check(context_ >= 2, "the context must hold at least 2 positions");
  thread_ = std::thread([this] { loop(); });
}

Scheduler::~Scheduler() { shutdown(); }

std::shared_ptr<Generation> Scheduler::submit(GenerationRequest request) {
  const int64_t n = static_cast<int64_t>(request.prompt.size());
  check(n > 0, "the prompt is empty");
  check(n < context_, "the prompt has " + std::to_string(n) + " tokens; the context holds " + std::to_string(context_) +
                          " (prompt plus at least one generated token)");
  check(request.max_tokens >= 1, "max_tokens must be at least 1");
  const int64_t vocab = model_.config().vocab;
  for (int32_t id : request.prompt)
    check(id >= 0 && id < vocab, "token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                                     std::to_string(vocab) + ")");
  Sampler probe(request.sampling);  // validates temperature / top-k / top-p
  (void)probe;
  auto gen = std::make_shared<Generation>(n);
  auto seq = std::make_unique<Sequence>(gen, std::move(request));
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopping_) throw Busy("the server is shutting down", true);
    if (running_count_ + static_cast<int64_t>(queue_.size()) >= options_.max_pending)
      throw Busy("the server is busy (" + std::to_string(options_.max_pending) + " requests in progress)", false);
    queue_.push_back(std::move(seq));
  }
  wake_.notify_one();
  return gen;
}

void Scheduler::shutdown() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
}

Scheduler::Stats Scheduler::stats() const {
  std::lock_guard<std::mutex> lock(mutex_);
  Stats s = stats_;
  s.running = running_count_;
  s.queued = static_cast<int64_t>(queue_.size());
  return s;
}

bool Scheduler::is_eos(int32_t id) const {
  const auto& eos = model_.config().eos_ids;
  const auto& extra = options_.extra_eos_ids;
  return std::find(eos.begin(), eos.end(), id) != eos.end() || std::find(extra.begin(), extra.end(), id) != extra.end();
}

namespace {

// log-softmax of the chosen token and the k most likely tokens (best first, ties by id).
void fill_logprobs(const float* logits, int64_t vocab, int k, TokenOut& out) {
  const float max = *std::max_element(logits, logits + vocab);
  double sum = 0.0;
  for (int64_t i = 0; i < vocab; ++i) sum += std::exp(static_cast<double>(logits[i] - max));
  const double log_z = static_cast<double>(max) + std::log(sum);
  out.logprob = static_cast<float>(static_cast<double>(logits[out.id]) - log_z);
  if (k <= 0) return;
  std::vector<int32_t> ids(static_cast<size_t>(vocab));
  std::iota(ids.begin(), ids.end(), 0);
  const size_t keep = std::min(static_cast<size_t>(k), ids.size());
  std::partial_sort(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(keep), ids.end(), [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  });
  out.top.reserve(keep);
  for (size_t i = 0; i < keep; ++i)
    out.top.emplace_back(ids[i], static_cast<float>(static_cast<double>(logits[ids[i]]) - log_z));
}

}  // namespace

void Scheduler::loop() {
  std::vector<std::unique_ptr<Sequence>> running;
  const int64_t vocab = model_.config().vocab;
  std::vector<DecodeSegment> segments;
  std::vector<Sequence*> stepped;
  while (true) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return stopping_ || !queue_.empty() || !running.empty(); });
      if (stopping_) break;
      // Queued requests that were cancelled or ran out of time leave without ever running.
      const auto now = Clock::now();
      for (auto it = queue_.begin(); it != queue_.end();) {
        Sequence& s = **it;
        if (s.gen->cancelled() || now >= s.req.deadline) {
          s.gen->end(s.gen->cancelled() ? Finish::cancelled : Finish::deadline);
          it = queue_.erase(it);
        } else {
          ++it;
        }
      }
      while (static_cast<int>(running.size()) < options_.max_batch && !queue_.empty()) {
        running.push_back(std::move(queue_.front()));
        queue_.pop_front();
      }
      running_count_ = static_cast<int64_t>(running.size());
    }
    const auto now = Clock::now();
    std::erase_if(running, [&](const std::unique_ptr<Sequence>& s) {
      if (s->gen->cancelled()) s->gen->end(Finish::cancelled);
      else if (now >= s->req.deadline) s->gen->end(Finish::deadline);
      else return false;
      return true;
    });
    if (running.empty()) {
      std::lock_guard<std::mutex> lock(mutex_);
      running_count_ = 0;
      continue;
    }

    // One step: a prompt chunk of each sequence still prefilling (within the step's budget), one
    // token of every generating one.
    segments.clear();
    stepped.clear();
    int64_t budget = options_.prefill_chunk, prompt_run = 0;
    for (auto& sp : running) {
      Sequence& s = *sp;
      if (!s.cache) {  // admitted: its cache holds the prompt and every token it may still feed
        const int64_t want = static_cast<int64_t>(s.req.prompt.size()) + s.req.max_tokens;
        s.cache = std::make_unique<KVCache>(model_.config(), std::min(want, context_));
        if (!s.greedy()) s.logits = HostFloats(static_cast<size_t>(vocab), decoder_.gpu() != nullptr);
      }
      if (s.prefilling()) {
        if (budget <= 0) continue;
        const int64_t left = static_cast<int64_t>(s.req.prompt.size()) - s.prefilled;
        int64_t take = std::min(left, budget);
        // A multi-token prompt never runs a 1-token chunk: quantized kernels take another path for
        // one token than for several, and eval runs its prompts as multi-token passes too, so
        // keeping chunks at 2+ keeps a served prompt bit-identical to eval's.
        if (left - take == 1) take = left;
        if (take == 1 && left > 1) continue;
        budget -= take;
        prompt_run += take;
        const int64_t n_logits = take == left ? 1 : 0;
        segments.push_back({s.req.prompt.data() + s.prefilled, take, s.cache.get(), n_logits, s.logits.data(),
                            s.greedy() && n_logits > 0 ? &s.top : nullptr});
        // longrope: every chunk rotates as the whole prompt's one pass would (transformers' choice).
        segments.back().long_rope = rope_long_step(model_.config().rope, static_cast<int64_t>(s.req.prompt.size()) - 1);
      } else {
        segments.push_back({&s.last, 1, s.cache.get(), 1, s.logits.data(), s.greedy() ? &s.top : nullptr});
      }
      stepped.push_back(&s);
    }
    if (segments.empty()) continue;
    const auto t0 = Clock::now();
    try {
      decoder_.forward_batch(segments);
    } catch (const std::exception& e) {
      // Inputs are validated at submit, so this is an internal failure: end the step's sequences.
      for (Sequence* s : stepped) {
        s->gen->end(Finish::error, e.what());
        s->gen->cancel();
      }
      std::erase_if(running, [](const std::unique_ptr<Sequence>& s) { return s->gen->cancelled(); });
      continue;
    }
    std::vector<Sequence*> ready;  // the sequences whose prompt is in: each chooses its next token
    for (size_t i = 0; i < stepped.size(); ++i) {
      Sequence& s = *stepped[i];
      if (s.prefilling()) {
        s.prefilled += segments[i].n;
        if (s.prefilling()) continue;  // more prompt chunks to come
      }
      ready.push_back(&s);
    }
    // Each sequence has its own sampler (and seed), so they choose in parallel when two or more sample
    // (~2 ms a token over a 128K vocabulary); greedy ones take the step's top token.
    std::vector<TokenOut> chosen(ready.size());
    const auto choose = [&](size_t k) {
      Sequence& s = *ready[k];
      TokenOut& tok = chosen[k];
      tok.id = s.greedy() ? s.top : s.sampler.sample(s.logits.data(), vocab);
      if (s.req.logprobs >= 0 && !(s.req.stop_at_eos && is_eos(tok.id))) fill_logprobs(s.logits.data(), vocab, s.req.logprobs, tok);
    };
    const auto sampling = std::count_if(ready.begin(), ready.end(), [](const Sequence* s) { return !s->greedy(); });
    if (sampling >= 2) {
      pool_.parallel_for(ready.size(), choose);
    } else {
      for (size_t k = 0; k < ready.size(); ++k) choose(k);
    }
    const auto sampled = static_cast<int64_t>(ready.size());
    for (size_t k = 0; k < ready.size(); ++k) {
      Sequence& s = *ready[k];
      TokenOut tok = std::move(chosen[k]);
      if (s.req.stop_at_eos && is_eos(tok.id)) {
        s.gen->end(Finish::eos);
        continue;
      }
      s.last = tok.id;
      s.gen->push(std::move(tok));
      ++s.generated;
      // The next step would feed this token: stop when the budget is spent or no position is left.
      if (s.generated >= s.req.max_tokens || s.cache->size() >= s.cache->capacity()) s.gen->end(Finish::length);
    }
    const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    std::erase_if(running, [](const std::unique_ptr<Sequence>& s) { return s->gen->finish() != Finish::running; });
    std::lock_guard<std::mutex> lock(mutex_);
    stats_.steps += 1;
    stats_.tokens += sampled;
    stats_.prompt_tokens += prompt_run;
    stats_.max_batch_seen = std::max<int64_t>(stats_.max_batch_seen, static_cast<int64_t>(segments.size()));
    stats_.busy_seconds += seconds;
    running_count_ = static_cast<int64_t>(running.size());
  }
  // Shutdown: nothing more runs.
  for (auto& s : running) s->gen->end(Finish::shutdown);
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto& s : queue_) s->gen->end(Finish::shutdown);
  queue_.clear();
  running_count_ = 0;
}

}  // namespace bioquant::serve
