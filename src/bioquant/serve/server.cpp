#include "bioquant/serve/server.h"

#include <arpa/inet.h>
#include <sys/socket.h>
#include <openssl/crypto.h>

#include <atomic>
#include <cstdio>
#include <ctime>
#include <future>
#include <optional>
#include <random>
#include <set>

#include <httplib.h>

#include "bioquant/core/hash.h"
#include "bioquant/eval/backend.h"
#include "bioquant/serve/bionlp.h"
#include "bioquant/serve/text_stream.h"
#include "bioquant/tokenizer/chat_template.h"
#include "bioquant/tokenizer/tokenizer.h"

namespace bioquant::serve {

using nlohmann::json;

bool is_loopback_host(const std::string& host_in) {
  std::string host = host_in;
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  if (host == "localhost") return true;
  in_addr a4{};
  if (inet_pton(AF_INET, host.c_str(), &a4) == 1) return (ntohl(a4.s_addr) >> 24) == 127;
  in6_addr a6{};
  if (inet_pton(AF_INET6, host.c_str(), &a6) == 1)
    return IN6_IS_ADDR_LOOPBACK(&a6) || (IN6_IS_ADDR_V4MAPPED(&a6) && a6.s6_addr[12] == 127);
  return false;  // other names may resolve anywhere
}

bool api_key_matches(std::string_view expected, std::string_view presented) {
  // Fixed-length digests compared without an early exit.
  const std::string a = sha256_hex(expected), b = sha256_hex(presented);
  return CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

namespace {

// httplib's own pool queues accepted connections without bound; this one makes accept() wait
// when `max_queued` connections are already waiting for a thread, so a flood of connections
// costs neither memory nor file descriptors beyond that.
class BoundedTaskQueue : public httplib::TaskQueue {
 public:
  BoundedTaskQueue(size_t threads, size_t max_queued) : max_queued_(max_queued) {
    for (size_t i = 0; i < threads; ++i) workers_.emplace_back([this] { work(); });
  }
  void enqueue(std::function<void()> fn) override {
    std::unique_lock<std::mutex> lock(mutex_);
    space_.wait(lock, [&] { return jobs_.size() < max_queued_ || stopping_; });
    jobs_.push_back(std::move(fn));
    lock.unlock();
    ready_.notify_one();
  }
  void shutdown() override {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    ready_.notify_all();
    space_.notify_all();
    for (auto& t : workers_) t.join();
  }

 private:
  void work() {
    while (true) {
      std::function<void()> fn;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        ready_.wait(lock, [&] { return !jobs_.empty() || stopping_; });
        if (jobs_.empty()) return;  // stopping, and every queued connection has been handed out
        fn = std::move(jobs_.front());
        jobs_.pop_front();
      }
      space_.notify_one();
      fn();
    }
  }

  size_t max_queued_;
  std::mutex mutex_;
  std::condition_variable ready_, space_;
  std::deque<std::function<void()>> jobs_;
  std::vector<std::thread> workers_;
  bool stopping_ = false;
};

std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

// What the log line of the request being served on this thread reports (httplib serves a request,
// streamed body included, on one thread, and calls the logger last).
struct RequestLog {
  uint64_t id = 0;
  Clock::time_point start;
  std::string route;  // the matched route pattern ("" = none)
  int64_t prompt_tokens = -1, completion_tokens = -1;
  std::string finish;
  std::string content;  // with log_content: the answer text
};
thread_local RequestLog t_log;

const char* status_type(int status) {
  switch (status) {
    case 401: return "authentication_error";
    case 404: return "not_found_error";
    default: return status >= 500 ? "server_error" : "invalid_request_error";
  }
}

// The sampling options of a request (temperature 0: greedy); an absent seed is drawn fresh.
SamplingOptions sampling_of(const SamplingParams& p, uint64_t seed) {
  SamplingOptions s;
  s.temperature = p.temperature;
  s.top_k = p.top_k;
  s.top_p = p.top_p;
  s.seed = p.seed.value_or(seed);
  return s;
}

json usage_json(int64_t prompt, int64_t completion) {
  return {{"prompt_tokens", prompt}, {"completion_tokens", completion}, {"total_tokens", prompt + completion}};
}

}  // namespace

struct Server::Impl {
  const Model& model;
  const Tokenizer& tokenizer;
  ServerOptions options;
  std::unique_ptr<Scheduler> scheduler;
  std::optional<ChatTemplate> chat;
  httplib::Server http;
  std::thread listener;
  std::future<void> listener_done;
  int port = 0;
  int listen_socket = -1;
  bool started = false, stopped = false;
  std::mutex lifecycle;
  std::atomic<uint64_t> next_id{1};
  std::mutex rng_mutex;
  std::mt19937_64 rng{std::random_device{}()};
  const int64_t created = static_cast<int64_t>(std::time(nullptr));

  Impl(const Model& m, const Tokenizer& t, ThreadPool& pool, ServerOptions o)
      : model(m), tokenizer(t), options(std::move(o)) {
    if (!options.log) options.log = [](const std::string& line) { std::fprintf(stderr, "%s\n", line.c_str()); };
    if (t.eos_id()) options.scheduler.extra_eos_ids.push_back(*t.eos_id());
    if (!t.chat_template().empty()) chat.emplace(t.chat_template());
    scheduler = std::make_unique<Scheduler>(m, pool, options.scheduler);
    routes();
  }

  uint64_t fresh_seed() {
    std::lock_guard<std::mutex> lock(rng_mutex);
    return rng();
  }
  Clock::time_point deadline() const {
    return Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(options.timeout_seconds));
  }

  void check_model(const std::string& name) const {
    if (!name.empty() && name != options.model_name && name != "default")
      throw ApiError(404, "invalid_request_error",
                     "model \"" + name + "\" is not served here (this server serves \"" + options.model_name + "\")",
                     "model", "model_not_found");
  }

  void check_context(size_t prompt_tokens, const std::string& param) const {
    if (prompt_tokens == 0) throw bad_request("the prompt encodes to no tokens", param);
    if (static_cast<int64_t>(prompt_tokens) >= scheduler->context())
      throw ApiError(400, "invalid_request_error",
                     "the prompt has " + std::to_string(prompt_tokens) + " tokens; this server's context is " +
                         std::to_string(scheduler->context()) + " (--ctx), prompt and answer together",
                     param, "context_length_exceeded");
  }

  std::vector<int32_t> encode_chat(const std::vector<ChatMessage>& messages) const {
    if (!chat) throw bad_request("the served model has no chat template: use /v1/completions", "messages");
    std::string rendered;
    try {
      rendered = chat->render(messages, true, tokenizer.bos_token(), tokenizer.eos_token());
    } catch (const Error& e) {
      throw bad_request(std::string("the model's chat template refused the messages: ") + e.what(), "messages");
    }
    // As transformers (and eval's LocalBackend): the template writes BOS; special-token text is recognised.
    return tokenizer.encode(rendered, /*add_special=*/false, /*parse_special=*/true);
  }

  // A task prompt exactly as eval's backends encode it.
  std::vector<int32_t> encode_task_prompt(const std::string& prompt) const {
    try {
      return eval::encode_prompt_text(tokenizer, prompt, options.chat_template);
    } catch (const Error& e) {
      throw bad_request(std::string("the model's chat template refused the prompt: ") + e.what());
    }
  }
  bool task_chat() const { return options.chat_template && chat.has_value(); }

  std::shared_ptr<Generation> submit(GenerationRequest request) {
    try {
      return scheduler->submit(std::move(request));
    } catch (const Busy& e) {
      throw ApiError(503, "server_error", e.what(), "", e.stopping ? "shutting_down" : "server_busy");
    }
  }

  // The finish_reason of an ended generation, or the error it ended with.
  std::string finish_reason(Finish f) const {
    switch (f) {
      case Finish::eos:
      case Finish::cancelled: return "stop";
      case Finish::length: return "length";
      case Finish::deadline: {
        char buf[64];
        std::snprintf(buf, sizeof buf, "%g", options.timeout_seconds);
        throw ApiError(503, "server_error", std::string("the request did not finish within the server's deadline of ") +
                                                buf + " s (--timeout)", "", "deadline_exceeded");
      }
      case Finish::shutdown: throw ApiError(503, "server_error", "the server is shutting down", "", "shutting_down");
      case Finish::running:
      case Finish::error: break;
    }
    throw ApiError(500, "server_error", "generation failed");
  }

  struct Collected {
    std::string text;
    std::vector<TokenOut> tokens;
    std::string finish_reason;
  };

  // Waits for a whole answer (non-streamed requests).
  Collected collect(Generation& gen, std::vector<std::string> stop) const {
    Collected c;
    if (stop.empty()) {  // nothing to watch for: one wake-up at the end, one decode (eval's)
      c.tokens = gen.wait_end();
      std::vector<int32_t> ids;
      ids.reserve(c.tokens.size());
      for (const TokenOut& t : c.tokens) ids.push_back(t.id);
      c.text = tokenizer.decode(ids, /*skip_special=*/true);
      c.finish_reason = finish_reason(gen.finish());
      return c;
    }
    TextStream ts(tokenizer, std::move(stop));
    std::vector<TokenOut> batch;
    while (!ts.stopped() && gen.next(batch)) {
      for (TokenOut& t : batch) {
        c.text += ts.push(t.id);
        c.tokens.push_back(std::move(t));
        if (ts.stopped()) break;
      }
    }
    if (ts.stopped()) gen.cancel();
    else c.text += ts.finish();
    c.finish_reason = ts.stopped() ? "stop" : finish_reason(gen.finish());
    return c;
  }

  // --- logprobs in OpenAI's two shapes ---------------------------------------------------------

  std::string token_text(int32_t id) const { return tokenizer.decode({id}, /*skip_special=*/false); }
  static json bytes_of(const std::string& s) {
    json b = json::array();
    for (unsigned char c : s) b.push_back(static_cast<int>(c));
    return b;
  }
  json chat_logprobs(const std::vector<TokenOut>& tokens) const {
    json content = json::array();
    for (const TokenOut& t : tokens) {
      const std::string s = token_text(t.id);
      json top = json::array();
      for (const auto& [id, lp] : t.top) {
        const std::string ts = token_text(id);
        top.push_back({{"token", ts}, {"logprob", lp}, {"bytes", bytes_of(ts)}});
      }
      content.push_back({{"token", s}, {"logprob", t.logprob}, {"bytes", bytes_of(s)}, {"top_logprobs", top}});
    }
    return {{"content", content}};
  }
  json completion_logprobs(const std::vector<TokenOut>& tokens, size_t& text_offset) const {
    json toks = json::array(), lps = json::array(), tops = json::array(), offsets = json::array();
    for (const TokenOut& t : tokens) {
      const std::string s = token_text(t.id);
      toks.push_back(s);
      lps.push_back(t.logprob);
      json top = json::object();
      for (const auto& [id, lp] : t.top) top[token_text(id)] = lp;
      tops.push_back(top);
      offsets.push_back(text_offset);
      text_offset += s.size();
    }
    return {{"tokens", toks}, {"token_logprobs", lps}, {"top_logprobs", tops}, {"text_offset", offsets}};
  }

  // --- the generation endpoints ----------------------------------------------------------------

  void generation(const httplib::Request& req, httplib::Response& res, bool is_chat) {
    const json body = parse_body(req.body, options.limits);
    SamplingParams sp;
    std::vector<int32_t> prompt;
    if (is_chat) {
      ChatRequest r = parse_chat_request(body, options.limits);
      check_model(r.model);
      prompt = encode_chat(r.messages);
      sp = std::move(r.sampling);
    } else {
      CompletionRequest r = parse_completion_request(body, options.limits);
      check_model(r.model);
      prompt = r.prompt_ids.empty() ? tokenizer.encode(r.prompt, /*add_special=*/true) : std::move(r.prompt_ids);
      sp = std::move(r.sampling);
    }
    check_context(prompt.size(), is_chat ? "messages" : "prompt");
    const int64_t prompt_tokens = static_cast<int64_t>(prompt.size());
    t_log.prompt_tokens = prompt_tokens;
    GenerationRequest g;
    g.prompt = std::move(prompt);
    // Chat answers may run to the cap (and stop at the context); completions default to OpenAI's 16.
    g.max_tokens = sp.max_tokens.value_or(is_chat ? options.limits.max_tokens_cap : options.limits.default_completion_tokens);
    g.sampling = sampling_of(sp, fresh_seed());
    g.logprobs = sp.logprobs;
    g.deadline = deadline();
    std::shared_ptr<Generation> gen = submit(std::move(g));

    const std::string id = (is_chat ? "chatcmpl-" : "cmpl-") + std::to_string(t_log.id) + "-" +
                           sha256_hex(std::to_string(fresh_seed())).substr(0, 12);
    const int64_t created_now = static_cast<int64_t>(std::time(nullptr));
    const char* object = is_chat ? "chat.completion" : "text_completion";
    if (!sp.stream) {
      Collected c = collect(*gen, sp.stop);
      json choice = {{"index", 0}, {"finish_reason", c.finish_reason}};
      size_t offset = 0;
      if (is_chat) {
        choice["message"] = {{"role", "assistant"}, {"content", c.text}};
        choice["logprobs"] = sp.logprobs >= 0 ? chat_logprobs(c.tokens) : json(nullptr);
      } else {
        choice["text"] = c.text;
        choice["logprobs"] = sp.logprobs >= 0 ? completion_logprobs(c.tokens, offset) : json(nullptr);
      }
      const int64_t completion = static_cast<int64_t>(c.tokens.size());
      json out = {{"id", id},           {"object", object},
                  {"created", created_now}, {"model", options.model_name},
                  {"choices", json::array({choice})}, {"usage", usage_json(prompt_tokens, completion)}};
      t_log.completion_tokens = completion;
      t_log.finish = c.finish_reason;
      if (options.log_content) t_log.content = c.text;
      res.set_content(dump(out), "application/json");
      return;
    }

    // Server-sent events: one chunk per step's new text, then the finish chunk, usage, [DONE].
    auto st = std::make_shared<Stream>(Stream{gen, TextStream(tokenizer, sp.stop), is_chat, sp.logprobs, sp.include_usage,
                                              id, created_now, prompt_tokens});
    res.set_header("Cache-Control", "no-cache");
    res.set_header("X-Accel-Buffering", "no");
    res.set_chunked_content_provider(
        "text/event-stream",
        [this, st](size_t, httplib::DataSink& sink) {
          try {
            return stream_events(*st, sink);
          } catch (const std::exception&) {  // nothing may escape into httplib's writer
            st->gen->cancel();
            t_log.finish = "internal_error";
            return false;
          }
        },
        [st](bool) { st->gen->cancel(); });
  }

  // One streamed answer in progress.
  struct Stream {
    std::shared_ptr<Generation> gen;
    TextStream text;
    bool chat = false;
    int logprobs = -1;
    bool include_usage = false;
    std::string id;
    int64_t created = 0;
    int64_t prompt_tokens = 0;
    int64_t completion = 0;
    size_t offset = 0;  // completions logprobs: text offset of the next token
  };

  // A chunk of a streamed answer: new text (with its tokens' logprobs), or the finish reason.
  json stream_chunk(Stream& st, const std::string& delta, const std::vector<TokenOut>* tokens,
                    const std::string& finish) const {
    json choice = {{"index", 0}, {"finish_reason", finish.empty() ? json(nullptr) : json(finish)}};
    if (st.chat) {
      choice["delta"] = finish.empty() ? json{{"content", delta}} : json::object();
      choice["logprobs"] = st.logprobs >= 0 && tokens ? chat_logprobs(*tokens) : json(nullptr);
    } else {
      choice["text"] = delta;
      choice["logprobs"] = st.logprobs >= 0 && tokens ? completion_logprobs(*tokens, st.offset) : json(nullptr);
    }
    return {{"id", st.id},
            {"object", st.chat ? "chat.completion.chunk" : "text_completion"},
            {"created", st.created},
            {"model", options.model_name},
            {"choices", json::array({choice})}};
  }

  // Writes the whole event stream (on httplib's thread for this connection). False: the client
  // went away, and the generation is cancelled.
  bool stream_events(Stream& st, httplib::DataSink& sink) {
    auto send = [&](const json& j) {
      const std::string event = "data: " + dump(j) + "\n\n";
      return sink.write(event.data(), event.size());
    };
    auto gone = [&] {
      st.gen->cancel();
      t_log.finish = "disconnected";
      return false;
    };
    if (st.chat) {
      json first = stream_chunk(st, "", nullptr, "");
      first["choices"][0]["delta"] = {{"role", "assistant"}, {"content", ""}};
      if (!send(first)) return gone();
    }
    std::vector<TokenOut> batch;
    while (!st.text.stopped() && st.gen->next(batch)) {
      std::string delta;
      std::vector<TokenOut> used;
      for (TokenOut& t : batch) {
        delta += st.text.push(t.id);
        used.push_back(std::move(t));
        if (st.text.stopped()) break;
      }
      st.completion += static_cast<int64_t>(used.size());
      if (options.log_content) t_log.content += delta;
      if ((!delta.empty() || st.logprobs >= 0) && !send(stream_chunk(st, delta, &used, ""))) return gone();
    }
    std::string finish;
    if (st.text.stopped()) {
      st.gen->cancel();
      finish = "stop";
    } else {
      const std::string tail = st.text.finish();
      if (options.log_content) t_log.content += tail;
      if (!tail.empty() && !send(stream_chunk(st, tail, nullptr, ""))) return gone();
      try {
        finish = finish_reason(st.gen->finish());
      } catch (const ApiError& e) {
        // Too late for a status code: the error is the stream's last event.
        t_log.finish = e.code.empty() ? "error" : e.code;
        send(error_json(e));
        sink.write("data: [DONE]\n\n", 14);
        sink.done();
        return true;
      }
    }
    t_log.completion_tokens = st.completion;
    t_log.finish = finish;
    if (!send(stream_chunk(st, "", nullptr, finish))) return gone();
    if (st.include_usage) {
      json u = stream_chunk(st, "", nullptr, "");
      u["choices"] = json::array();
      u["usage"] = usage_json(st.prompt_tokens, st.completion);
      if (!send(u)) return gone();
    }
    if (!sink.write("data: [DONE]\n\n", 14)) return gone();
    sink.done();
    return true;
  }

  // --- the task endpoints ----------------------------------------------------------------------

  void task(const httplib::Request& req, httplib::Response& res, TaskEndpoint endpoint) {
    const json body = parse_body(req.body, options.limits);
    const TaskQuery q = parse_task_request(endpoint, body, task_chat(), [this](const std::string& s) {
      return static_cast<int64_t>(tokenizer.encode(s, false, false).size());
    });
    std::vector<int32_t> prompt = encode_task_prompt(q.prompt);
    check_context(prompt.size(), endpoint == TaskEndpoint::qa ? "question" : "text");
    const int64_t prompt_tokens = static_cast<int64_t>(prompt.size());
    t_log.prompt_tokens = prompt_tokens;
    GenerationRequest g;
    g.prompt = std::move(prompt);
    g.max_tokens = q.max_tokens;  // greedy, the task's own budget: what eval runs
    g.deadline = deadline();
    std::shared_ptr<Generation> gen = submit(std::move(g));
    const Collected c = collect(*gen, {});
    json out = task_answer(q, c.text);
    out["model"] = options.model_name;
    out["usage"] = usage_json(prompt_tokens, static_cast<int64_t>(c.tokens.size()));
    t_log.completion_tokens = static_cast<int64_t>(c.tokens.size());
    t_log.finish = c.finish_reason;
    if (options.log_content) t_log.content = c.text;
    res.set_content(dump(out), "application/json");
  }

  // --- wiring ----------------------------------------------------------------------------------

  static void send_error(httplib::Response& res, const ApiError& e) {
    res.status = e.status;
    if (e.status == 503) res.set_header("Retry-After", "1");
    if (e.status == 401) res.set_header("WWW-Authenticate", "Bearer");
    res.set_content(dump(error_json(e)), "application/json");
  }

  // Runs a handler, turning what it throws into a JSON error answer.
  template <typename F>
  httplib::Server::Handler guarded(std::string route, F f) {
    return [this, route, f](const httplib::Request& req, httplib::Response& res) {
      t_log.route = route;
      try {
        f(req, res);
      } catch (const ApiError& e) {
        t_log.finish = e.code.empty() ? e.type : e.code;
        send_error(res, e);
      } catch (const Error& e) {  // library errors are about the input (tokens, template, limits)
        send_error(res, bad_request(e.what()));
      } catch (const std::exception&) {
        send_error(res, ApiError(500, "server_error", "internal server error"));
      }
    };
  }

  void method_not_allowed(const std::string& path, const char* allowed) {
    auto handler = [allowed](const httplib::Request& req, httplib::Response& res) {
      res.set_header("Allow", allowed);
      send_error(res, ApiError(405, "invalid_request_error", req.method + " is not allowed here (use " + allowed + ")"));
    };
    if (std::string(allowed) == "POST") {
      http.Get(path, handler);
    } else {
      http.Post(path, handler);
    }
    http.Put(path, handler);
    http.Delete(path, handler);
    http.Patch(path, handler);
  }

  void routes() {
    http.Get("/health", guarded("/health", [](const httplib::Request&, httplib::Response& res) {
      res.set_content(R"({"status":"ok"})", "application/json");
    }));
    auto model_json = [this] {
      return json{{"id", options.model_name},
                  {"object", "model"},
                  {"created", created},
                  {"owned_by", "bioquant"},
                  {"max_model_len", scheduler->context()}};
    };
    http.Get("/v1/models", guarded("/v1/models", [model_json](const httplib::Request&, httplib::Response& res) {
      res.set_content(dump({{"object", "list"}, {"data", json::array({model_json()})}}), "application/json");
    }));
    http.Get(R"(/v1/models/(.+))", guarded("/v1/models/{id}", [this, model_json](const httplib::Request& req,
                                                                              httplib::Response& res) {
      if (req.matches[1] != options.model_name)
        throw ApiError(404, "invalid_request_error", "no such model (this server serves \"" + options.model_name + "\")",
                       "model", "model_not_found");
      res.set_content(dump(model_json()), "application/json");
    }));
    http.Post("/v1/completions", guarded("/v1/completions", [this](const httplib::Request& req, httplib::Response& res) {
      generation(req, res, false);
    }));
    http.Post("/v1/chat/completions",
              guarded("/v1/chat/completions",
                      [this](const httplib::Request& req, httplib::Response& res) { generation(req, res, true); }));
    for (TaskEndpoint e : {TaskEndpoint::ner, TaskEndpoint::relation, TaskEndpoint::classify, TaskEndpoint::qa}) {
      http.Post(endpoint_path(e), guarded(endpoint_path(e), [this, e](const httplib::Request& req, httplib::Response& res) {
        task(req, res, e);
      }));
      method_not_allowed(endpoint_path(e), "POST");
    }
    method_not_allowed("/v1/completions", "POST");
    method_not_allowed("/v1/chat/completions", "POST");
    method_not_allowed("/v1/models", "GET");
    method_not_allowed("/health", "GET");

    // Authentication, before the body is read.
    http.set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
      t_log = RequestLog{};
      t_log.id = next_id.fetch_add(1);
      t_log.start = Clock::now();
      res.set_header("X-Request-Id", std::to_string(t_log.id));
      // httplib caps bodies by their Content-Length only: a chunked body, or one read until the
      // connection closes, would be taken whole into memory. Only sized bodies are accepted.
      if (req.method == "POST" || req.method == "PUT" || req.method == "PATCH" || req.method == "DELETE") {
        if (req.has_header("Transfer-Encoding") || !req.has_header("Content-Length")) {
          t_log.finish = "length_required";
          send_error(res, ApiError(411, "invalid_request_error",
                                   "send the request body with a Content-Length (chunked or unsized bodies are not accepted)",
                                   "", "length_required"));
          return httplib::Server::HandlerResponse::Handled;
        }
        // A Content-Length that is no number (httplib would read it as "endless"). Too large ones are
        // httplib's: it answers 413 and drains the body, which keeps the connection in step.
        const std::string length = req.get_header_value("Content-Length");
        if (length.empty() || length.size() > 18 || length.find_first_not_of("0123456789") != std::string::npos) {
          t_log.finish = "bad_length";
          send_error(res, ApiError(400, "invalid_request_error", "malformed Content-Length"));
          return httplib::Server::HandlerResponse::Handled;
        }
      }
      if (options.api_key.empty() || req.path == "/health") return httplib::Server::HandlerResponse::Unhandled;
      const std::string auth = req.get_header_value("Authorization");
      std::string key;
      if (auth.size() > 7 && (auth.compare(0, 7, "Bearer ") == 0 || auth.compare(0, 7, "bearer ") == 0)) {
        key = auth.substr(7);
        while (!key.empty() && key.front() == ' ') key.erase(0, 1);
        while (!key.empty() && key.back() == ' ') key.pop_back();
      }
      if (key.empty()) {
        t_log.finish = "missing_api_key";
        send_error(res, ApiError(401, "authentication_error",
                                 "an API key is required: send \"Authorization: Bearer KEY\"", "", "missing_api_key"));
        return httplib::Server::HandlerResponse::Handled;
      }
      if (!api_key_matches(options.api_key, key)) {
        t_log.finish = "invalid_api_key";
        send_error(res, ApiError(401, "authentication_error", "invalid API key", "", "invalid_api_key"));
        return httplib::Server::HandlerResponse::Handled;
      }
      return httplib::Server::HandlerResponse::Unhandled;
    });
    // Errors httplib answers itself (no route, body too large, malformed HTTP) get a JSON body too.
    http.set_error_handler(httplib::Server::HandlerWithResponse([this](const httplib::Request& req, httplib::Response& res) {
      if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
      std::string message;
      switch (res.status) {
        case 404:
          message = "no such endpoint: " + req.method + " " + (options.log_content || req.path.size() < 200 ? req.path : "");
          break;
        case 413: message = "the request body is larger than " + std::to_string(options.max_body_bytes) + " bytes"; break;
        case 414: message = "the request URI is too long"; break;
        case 400: message = "malformed HTTP request"; break;
        default: message = "HTTP " + std::to_string(res.status); break;
      }
      res.set_content(dump(error_json(ApiError(res.status, status_type(res.status), message))), "application/json");
      return httplib::Server::HandlerResponse::Handled;
    }));
    http.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr) {
      send_error(res, ApiError(500, "server_error", "internal server error"));
    });
    http.set_logger([this](const httplib::Request& req, const httplib::Response& res) {
      if (t_log.id == 0) {  // answered before routing (malformed HTTP)
        t_log.id = next_id.fetch_add(1);
        t_log.start = Clock::now();
      }
      const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t_log.start).count();
      // The route pattern, never the raw path (it may carry text) unless content logging is on.
      std::string where = t_log.route.empty() ? (options.log_content ? req.path : "-") : t_log.route;
      char buf[512];
      // Likewise the method: a malformed request line may have put anything there.
      static const std::set<std::string> methods = {"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"};
      const std::string method = methods.count(req.method) || options.log_content ? req.method : "-";
      std::snprintf(buf, sizeof buf, "serve: #%llu %s %s %d %.1f ms", static_cast<unsigned long long>(t_log.id),
                    method.empty() ? "-" : method.c_str(), where.c_str(), res.status, ms);
      std::string line = buf;
      if (t_log.prompt_tokens >= 0) line += " prompt=" + std::to_string(t_log.prompt_tokens);
      if (t_log.completion_tokens >= 0) line += " completion=" + std::to_string(t_log.completion_tokens);
      if (!t_log.finish.empty()) line += " " + t_log.finish;
      if (options.log_content) {
        line += "\n  request: " + req.body;
        line += "\n  answer: " + (res.body.empty() ? t_log.content : res.body);
      }
      options.log(line);
      t_log = RequestLog{};
    });

    http.new_task_queue = [this] {
      return new BoundedTaskQueue(static_cast<size_t>(options.http_threads), static_cast<size_t>(options.accept_backlog));
    };
    http.set_payload_max_length(options.max_body_bytes);
    http.set_read_timeout(10, 0);
    http.set_write_timeout(30, 0);
    http.set_keep_alive_max_count(1000);
    http.set_keep_alive_timeout(5);
    http.set_tcp_nodelay(true);
    // httplib listens with a backlog of 5: a burst of new connections then overflows it and the
    // dropped SYNs cost a second each. Remember the socket, so start() can listen again with a
    // real backlog. (SO_REUSEADDR as httplib's default, but not SO_REUSEPORT: nobody else may
    // bind this port next to us.)
    http.set_socket_options([this](socket_t sock) {
      int yes = 1;
      ::setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
      listen_socket = sock;
    });
  }
};

Server::Server(const Model& model, const Tokenizer& tokenizer, ThreadPool& pool, ServerOptions options)
    : impl_(std::make_unique<Impl>(model, tokenizer, pool, std::move(options))) {}

Server::~Server() { shutdown(std::chrono::milliseconds(0)); }

void Server::start() {
  Impl& s = *impl_;
  std::lock_guard<std::mutex> lock(s.lifecycle);
  check(!s.started, "the server was started already");
  check(s.options.http_threads >= 1 && s.options.accept_backlog >= 1, "the server needs at least one HTTP thread");
  if (!is_loopback_host(s.options.host))
    check(!s.options.api_key.empty(), "refusing to listen on " + s.options.host +
                                          ", which is not a loopback address, without an API key: give --api-key-file "
                                          "FILE (or serve on 127.0.0.1)");
  if (s.options.port == 0) {
    s.port = s.http.bind_to_any_port(s.options.host);
    check(s.port > 0, "cannot listen on " + s.options.host + " (any port)");
  } else {
    check(s.http.bind_to_port(s.options.host, s.options.port),
          "cannot listen on " + s.options.host + ":" + std::to_string(s.options.port) + " (in use, or not an address of this machine)");
    s.port = s.options.port;
  }
  if (s.listen_socket >= 0) ::listen(s.listen_socket, s.options.accept_backlog);
  std::packaged_task<void()> run([&s] { s.http.listen_after_bind(); });
  s.listener_done = run.get_future();
  s.listener = std::thread(std::move(run));
  s.started = true;
  // Serving before start() returns, so that a stop() right after it is never lost.
  while (!s.http.is_running() && s.listener_done.wait_for(std::chrono::milliseconds(1)) != std::future_status::ready) {
  }
}

int Server::port() const { return impl_->port; }

std::string Server::url() const {
  const std::string& h = impl_->options.host;
  const bool v6 = h.find(':') != std::string::npos && h.front() != '[';
  return "http://" + (v6 ? "[" + h + "]" : h) + ":" + std::to_string(impl_->port);
}

void Server::shutdown(std::chrono::milliseconds grace) {
  Impl& s = *impl_;
  std::lock_guard<std::mutex> lock(s.lifecycle);
  if (s.stopped) return;
  s.stopped = true;
  if (s.started) {
    s.http.stop();  // no new connections; requests in progress go on
    if (s.listener_done.wait_for(grace) != std::future_status::ready) s.scheduler->shutdown();
    s.listener.join();
  }
  s.scheduler->shutdown();
}

Scheduler::Stats Server::stats() const { return impl_->scheduler->stats(); }
size_t Server::gpu_peak_bytes() const { return impl_->scheduler->gpu_peak_bytes(); }

}  // namespace bioquant::serve
