// `bioquant serve`: a local HTTP server (cpp-httplib) in front of one model.
//
//   GET  /health                 {"status": "ok"} (no key needed: for liveness probes; says nothing else)
//   GET  /v1/models              the served model, OpenAI's list format (and /v1/models/{id})
//   POST /v1/completions         OpenAI completions: prompt (text or token ids), max_tokens, temperature,
//                                top_p, top_k, seed, stop, stream (SSE), logprobs
//   POST /v1/chat/completions    OpenAI chat: messages through the model's chat template; the same
//                                options, logprobs/top_logprobs
//   POST /v1/bionlp/{ner,relation,classify,qa}   task endpoints (bionlp.h)
//
// Every request is a sequence of the continuous-batching scheduler (scheduler.h), so concurrent
// requests share each decoding step. A prompt is encoded exactly as `bioquant eval` encodes it
// (chat: one rendering of the template with add_generation_prompt, special-token text recognised,
// no extra BOS; completions: the tokenizer's BOS/EOS rules), and EOS ends a sequence without being
// returned, so a greedy request gives eval's text token for token.
//
// Security: binds to loopback unless an API key is set (start() refuses otherwise); with a key, every
// route but /health needs "Authorization: Bearer KEY", compared in constant time (SHA-256 digests
// compared with CRYPTO_memcmp: neither the key's length nor the first differing byte shows in the
// time taken). Bodies over max_body_bytes get 413, max_tokens over the cap and any malformed or
// unknown JSON field get 400, each request has a deadline (503 deadline_exceeded), and at most
// scheduler.max_pending requests are in progress (503 server_busy beyond). Every error is a JSON
// body {"error": {...}}. The log has one line per request (id, method, path, status, milliseconds,
// token counts) and never request or response text unless log_content is set. The server opens no
// outbound connection.
#pragma once
#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "bioquant/serve/api.h"
#include "bioquant/serve/scheduler.h"

namespace bioquant {
class Tokenizer;
}

namespace bioquant::serve {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;                       // 0: any free port (port() tells which)
  std::string api_key;                   // "" = no authentication (then only a loopback host is allowed)
  std::string model_name = "bioquant";   // the model id in /v1/models and in answers
  size_t max_body_bytes = size_t(1) << 20;
  double timeout_seconds = 300.0;        // per-request deadline, queueing included
  bool log_content = false;              // log request bodies and answer text (off: never)
  bool chat_template = true;             // task endpoints wrap prompts in the chat template (as eval)
  int http_threads = 64;                 // connections served at once (each holds a thread)
  int accept_backlog = 256;              // connections waiting for a thread (the listen backlog, and the
                                         // accepted ones queued for a thread; accept() pauses beyond)
  ApiLimits limits;
  SchedulerOptions scheduler;
  std::function<void(const std::string&)> log;  // one line per request; default: stderr
};

class Server {
 public:
  // The model, tokenizer and pool must outlive the server; the pool is the scheduler's alone.
  Server(const Model& model, const Tokenizer& tokenizer, ThreadPool& pool, ServerOptions options);
  ~Server();  // shutdown(0)
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // Binds and serves on a background thread. Throws Error when the host is not loopback and no API
  // key is set, or the address cannot be bound.
  void start();
  int port() const;
  std::string url() const;  // http://HOST:PORT

  // Stops accepting connections, lets requests in progress finish for up to `grace`, then ends the
  // rest (503 shutting_down / a final SSE error event) and joins every thread. Idempotent.
  void shutdown(std::chrono::milliseconds grace);

  Scheduler::Stats stats() const;
  size_t gpu_peak_bytes() const;  // after shutdown()

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// 127.0.0.0/8, ::1, ::ffff:127.x.x.x and "localhost".
bool is_loopback_host(const std::string& host);
// Constant-time comparison of a presented key with the expected one.
bool api_key_matches(std::string_view expected, std::string_view presented);

}  // namespace bioquant::serve
