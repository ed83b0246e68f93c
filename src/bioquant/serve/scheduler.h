// Continuous batching: one scheduler thread owns the decoder and, step after step, runs every
// active sequence together in one Decoder::forward_batch — a prompt chunk for sequences that are
// new, one token for those already generating — so the weights are read once per step for all of
// them. Requests join and leave between any two steps; nobody waits for a batch to drain.
//
// Token level only: sampling, EOS, max_tokens, the context limit, deadlines and cancellation.
// Turning tokens into text (and stop strings) is the request side's job (text_stream.h), so that
// work runs on the request threads, not in the one thread every sequence waits for.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "bioquant/core/error.h"
#include "bioquant/core/thread_pool.h"
#include "bioquant/engine/sampler.h"
#include "bioquant/model/decoder.h"

namespace bioquant::serve {

using Clock = std::chrono::steady_clock;

struct SchedulerOptions {
  int max_batch = 16;            // sequences decoded together in one step
  int max_pending = 256;         // sequences running or queued; submit() refuses more (Busy)
  int64_t prefill_chunk = 256;   // prompt tokens run per step over all new sequences (bounds a step's time; >= 2)
  int64_t context = 0;           // positions per sequence (0: the model's max_positions, else 4096)
  std::vector<int32_t> extra_eos_ids;  // ids that also end a sequence, besides the model's (the tokenizer's EOS)
  int device = -1;                     // -1: CPU; N: CUDA device N (the batch's rows share every matmul there too)
  KvType kv = KvType::BF16;            // GPU KV cache type
  bool exact = false;                  // exact numerics (Decoder's): the same answers on any device
};

struct GenerationRequest {
  std::vector<int32_t> prompt;  // non-empty and shorter than the context
  int64_t max_tokens = 16;      // >= 1; generation also ends when the context is full
  SamplingOptions sampling;     // greedy when temperature == 0
  bool stop_at_eos = true;      // the model's EOS ids end the sequence (and are not returned)
  int logprobs = -1;            // -1: none; k >= 0: each token's log-probability and the k most likely
  Clock::time_point deadline = Clock::time_point::max();
};

// One generated token. Log-probabilities are of the model's own distribution (log-softmax of the
// raw logits, before temperature / top-k / top-p).
struct TokenOut {
  int32_t id = 0;
  float logprob = 0.0f;                         // when logprobs >= 0
  std::vector<std::pair<int32_t, float>> top;   // the `logprobs` most likely, best first
};

enum class Finish {
  running,    // not finished yet
  eos,        // an EOS token
  length,     // max_tokens, or the context is full
  cancelled,  // cancel() (a stop string was met, the client went away)
  deadline,   // the request's deadline passed
  shutdown,   // the scheduler stopped
  error,      // the forward pass failed (error() says why)
};
const char* finish_name(Finish f);

// The link between the scheduler and one request: the scheduler appends tokens, the request side
// takes them as they come (thread-safe).
class Generation {
 public:
  explicit Generation(int64_t prompt_tokens) : prompt_tokens_(prompt_tokens) {}

  // Waits for new tokens or the end; moves the new tokens into `out` (cleared first). Returns
  // false when the generation has ended and every token has been taken.
  bool next(std::vector<TokenOut>& out);
  // Waits for the end and returns every token not taken yet (no wake-up per token: the way for a
  // consumer that needs the whole answer anyway).
  std::vector<TokenOut> wait_end();
  // Asks the scheduler to drop the sequence at its next step (finish becomes `cancelled` unless it
  // ended otherwise first).
  void cancel() { cancelled_.store(true); }
  bool cancelled() const { return cancelled_.load(); }

  Finish finish() const;
  std::string error() const;
  int64_t prompt_tokens() const { return prompt_tokens_; }

 private:
  friend class Scheduler;
  void push(TokenOut token);
  void end(Finish finish, std::string error = "");

  const int64_t prompt_tokens_;
  mutable std::mutex mutex_;
  std::condition_variable ready_;
  std::vector<TokenOut> pending_;
  int token_waiters_ = 0;  // threads in next(): push() wakes them
  Finish finish_ = Finish::running;
  std::string error_;
  std::atomic<bool> cancelled_{false};
};

// submit() when max_pending sequences are already running or queued, or after shutdown().
class Busy : public Error {
 public:
  Busy(const std::string& message, bool stopping) : Error(message), stopping(stopping) {}
  bool stopping;  // refused because the scheduler is shutting down
};

class Scheduler {
 public:
  // `pool` is used by the scheduler thread only (ThreadPool::parallel_for is not re-entrant).
  Scheduler(const Model& model, ThreadPool& pool, SchedulerOptions options);
  ~Scheduler();  // shutdown()
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  // Queues a sequence. Throws Error for an invalid request (empty prompt, prompt not shorter than
  // the context, max_tokens < 1, bad sampling options) and Busy when full or stopped.
  std::shared_ptr<Generation> submit(GenerationRequest request);
  // Ends every running and queued sequence (Finish::shutdown) and joins the thread. Idempotent.
  void shutdown();

  int64_t context() const { return context_; }
  const SchedulerOptions& options() const { return options_; }

  struct Stats {
    int64_t steps = 0;           // forward passes
    int64_t tokens = 0;          // tokens sampled
    int64_t prompt_tokens = 0;   // prompt tokens run
    int64_t max_batch_seen = 0;  // most sequences in one step
    int64_t running = 0, queued = 0;
    double busy_seconds = 0.0;   // time spent in steps
  };
  Stats stats() const;
  // The decoder's GPU memory peak (our allocations; 0 on the CPU). Call once the scheduler has stopped.
  size_t gpu_peak_bytes() const { return decoder_.gpu() ? decoder_.gpu()->memory().peak_allocated : 0; }

 private:
  struct Sequence;
  void loop();
  bool is_eos(int32_t id) const;

  const Model& model_;
  ThreadPool& pool_;  // the decoder's, and the sequences' sampling after each step
  Decoder decoder_;
  SchedulerOptions options_;
  int64_t context_ = 0;

  mutable std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::unique_ptr<Sequence>> queue_;
  int64_t running_count_ = 0;
  bool stopping_ = false;
  Stats stats_;
  std::thread thread_;
};

}  // namespace bioquant::serve
