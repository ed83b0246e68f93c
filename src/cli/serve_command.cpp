// `bioquant serve`: the model behind a local HTTP server (bioquant/serve/server.h). A thin shell:
// flags, the API key file, signals.
#include <signal.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>

#include "bioquant/core/error.h"
#include "bioquant/core/mapped_file.h"
#include "bioquant/eval/task.h"
#include "bioquant/serve/server.h"
#include "bioquant/tokenizer/tokenizer.h"
#include "cli/commands.h"
#include "cli/common.h"

namespace bioquant::cli {

namespace {

// The key is the file's content without surrounding whitespace.
std::string read_api_key(const std::string& path) {
  struct stat st {};
  check(::stat(path.c_str(), &st) == 0, "--api-key-file " + path + ": no such file");
  std::string key = read_text_file(path);
  const auto first = key.find_first_not_of(" \t\r\n");
  const auto last = key.find_last_not_of(" \t\r\n");
  key = first == std::string::npos ? "" : key.substr(first, last - first + 1);
  check(!key.empty(), "--api-key-file " + path + " is empty");
  check(key.size() >= 16, "--api-key-file " + path + ": the key is shorter than 16 characters; use a random one "
                          "(e.g. openssl rand -hex 32)");
  check(key.find_first_of(" \t\r\n") == std::string::npos, "--api-key-file " + path + ": the key must be one word");
  if (st.st_mode & (S_IRWXG | S_IRWXO))
    std::fprintf(stderr, "warning: %s is readable by other users (chmod 600 it)\n", path.c_str());
  return key;
}

Run add_serve(CLI::App& app) {
  auto c = std::make_shared<Common>();
  add_model_flags(app, *c);
  struct Flags {
    std::string host = "127.0.0.1", api_key_file, model_name;
    int port = 8080, max_batch = 32, http_threads = 64;
    int64_t ctx = 0, max_tokens = 2048, max_body = int64_t(1) << 20;
    double timeout = 300.0, grace = 10.0;
    bool log_content = false, no_chat = false;
    std::vector<std::string> task_files;
  };
  auto f = std::make_shared<Flags>();
  app.add_option("--host", f->host, "address to listen on (default 127.0.0.1; anything but loopback needs --api-key-file)");
  app.add_option("--port", f->port, "port (default 8080; 0 = any free port, printed at start)")->check(CLI::Range(0, 65535));
  app.add_option("--api-key-file", f->api_key_file, "require \"Authorization: Bearer KEY\" with the key in this file");
  app.add_option("--model-name", f->model_name, "model id in /v1/models and answers (default: the model's file name)");
  app.add_option("--ctx", f->ctx, "positions per sequence, prompt and answer (default: the model's maximum)")
      ->check(CLI::Range(int64_t(2), int64_t(1) << 20));
  app.add_option("--max-batch", f->max_batch, "sequences decoded together (default 32)")->check(CLI::Range(1, 1024));
  app.add_option("--max-tokens", f->max_tokens, "largest max_tokens a request may ask (default 2048)")
      ->check(CLI::Range(int64_t(1), int64_t(1) << 20));
  app.add_option("--max-body-bytes", f->max_body, "largest request body (default 1048576; larger: 413)")
      ->check(CLI::Range(int64_t(1024), int64_t(1) << 30));
  app.add_option("--timeout", f->timeout, "per-request deadline in seconds, queueing included (default 300)")
      ->check(CLI::Range(0.1, 86400.0));
  app.add_option("--http-threads", f->http_threads, "connections served at once (default 64)")->check(CLI::Range(1, 4096));
  app.add_option("--shutdown-grace", f->grace, "seconds requests in progress get after SIGINT/SIGTERM (default 10)")
      ->check(CLI::Range(0.0, 3600.0));
  app.add_flag("--log-content", f->log_content, "log request bodies and answer text (off by default: never logged)");
  app.add_flag("--no-chat-template", f->no_chat, "task endpoints send plain prompts even if the model has a chat template");
  app.add_option("--task-file", f->task_files, "add a task from a JSON description (repeatable)");
  return [=]() {
    const int device = check_device(*c);
    for (const auto& file : f->task_files) eval::register_task(eval::load_task_file(file));
    serve::ServerOptions o;
    o.host = f->host;
    o.port = f->port;
    if (!f->api_key_file.empty()) o.api_key = read_api_key(f->api_key_file);
    // Refused before the model is loaded: a mistake costs a second, not a load.
    check(serve::is_loopback_host(o.host) || !o.api_key.empty(),
          "refusing to listen on " + o.host + ", which is not a loopback address, without an API key: give "
          "--api-key-file FILE (or serve on 127.0.0.1)");
    std::string name = f->model_name;
    if (name.empty()) {
      std::filesystem::path p(c->model);
      if (!p.has_filename()) p = p.parent_path();
      name = p.filename().string();
      if (p.extension() == ".gguf") name = p.stem().string();
      if (!c->quant.empty()) name += "-" + c->quant;
    }
    o.model_name = name;
    o.max_body_bytes = static_cast<size_t>(f->max_body);
    o.timeout_seconds = f->timeout;
    o.log_content = f->log_content;
    o.chat_template = !f->no_chat;
    o.http_threads = f->http_threads;
    o.limits.max_tokens_cap = f->max_tokens;
    o.scheduler.max_batch = f->max_batch;
    o.scheduler.max_pending = std::max(f->max_batch, f->http_threads);
    o.scheduler.context = f->ctx;
    o.scheduler.device = device;
    o.scheduler.kv = apply_gpu_flags(*c, device);
    o.scheduler.exact = c->exact;

    // SIGINT/SIGTERM are taken by this thread only (sigwait below): every thread started from here
    // on inherits the mask.
    sigset_t signals;
    sigemptyset(&signals);
    sigaddset(&signals, SIGINT);
    sigaddset(&signals, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &signals, nullptr);

    ThreadPool pool(c->threads);
    auto model = open_model(*c, pool);
    auto tokenizer = load_tokenizer(c->model);
    serve::Server server(*model, *tokenizer, pool, o);
    server.start();
    const int64_t ctx = f->ctx > 0 ? f->ctx : (model->config().max_positions > 0 ? model->config().max_positions : 4096);
    std::fprintf(stderr, "serving %s on %s (context %lld, batch %d, %d threads%s%s)\n", name.c_str(),
                 server.url().c_str(), static_cast<long long>(ctx), f->max_batch, pool.size(),
                 o.api_key.empty() ? "" : ", API key required",
                 tokenizer->chat_template().empty() ? ", no chat template" : "");
    std::fflush(stderr);

    int sig = 0;
    sigwait(&signals, &sig);
    std::fprintf(stderr, "%s: shutting down (requests in progress get %.0f s)\n", sig == SIGINT ? "SIGINT" : "SIGTERM",
                 f->grace);
    server.shutdown(std::chrono::milliseconds(static_cast<int64_t>(f->grace * 1000.0)));
    const auto s = server.stats();
    std::fprintf(stderr, "served: %lld tokens generated, %lld prompt tokens, %lld steps (largest batch %lld)\n",
                 static_cast<long long>(s.tokens), static_cast<long long>(s.prompt_tokens),
                 static_cast<long long>(s.steps), static_cast<long long>(s.max_batch_seen));
    report_peak_memory();
    if (const size_t gpu = server.gpu_peak_bytes(); gpu > 0)
      std::fprintf(stderr, "GPU peak allocated: %.1f MiB\n", static_cast<double>(gpu) / (1024.0 * 1024.0));
    return 0;
  };
}

}  // namespace

static const CommandRegistration reg(120, "serve",
                                     "Serve the model over HTTP: OpenAI-compatible and biomedical task endpoints",
                                     add_serve);

}  // namespace bioquant::cli
