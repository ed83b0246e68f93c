// Load and fuzz run of `bioquant serve` (issue 8, acceptance 2 and 4). A tool, never a test:
//
//   build/bench/bioquant_serve_load --model models/biomed-tiny            (starts `bioquant serve --port 0`)
//   build/bench/bioquant_serve_load --endpoint http://127.0.0.1:8080 [--pid PID]   (a running server)
//
// 1. throughput: the same greedy chat requests from 1 client, then from 8 at once (requests/s,
//    completion tokens/s, the ratio; continuous batching should give >= 3x);
// 2. load: 32 clients x 20 requests at once: zero failures allowed, p50/p99 latency, throughput;
// 3. fuzz: >= 10,000 malformed requests (broken and truncated JSON, random bytes, wrong types,
//    unknown fields, values out of range, deep nesting, invalid UTF-8, oversized bodies, unknown
//    routes and methods, and raw-socket HTTP garbage): every one must get a 4xx JSON error (raw
//    garbage: a 4xx or a closed connection), the server must stay up, and its resident memory is
//    sampled throughout (bounded: the growth is printed and checked against --max-growth-mib);
// 4. SIGTERM (when it started the server): a clean exit.
// Prints a summary and one JSON line; exits non-zero when an acceptance check fails.
//
// `--make-model DIR --hidden H --layers L --ffn F` first writes a Llama of that shape with random
// bf16 weights and the tokenizer of --model into DIR, and serves it: a model too large for the
// CPU caches, where decoding is memory-bound, as real models are (biomed-tiny's 14 MB of weights
// stay in cache, so its decode is compute-bound and batching gains less). `--fuzz 0`, `--clients 0`
// skip those phases. `--api completions` sends plain-text continuations instead of chat turns
// (longer answers after shorter prompts: decode-heavy, where batching gains most).
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <httplib.h>
#include <nlohmann/json.hpp>

#include "bioquant/core/dtype.h"
#include "bioquant/core/half.h"
#include "bioquant/io/safetensors.h"

using nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

struct Options {
  std::string endpoint, model, bioquant = BIOQUANT_CLI, make_model, api = "chat";
  int hidden = 1024, layers = 8, ffn = 2816;
  int pid = 0, threads = 0;
  int clients = 32, requests = 20, max_tokens = 32, throughput_requests = 16, rounds = 3, fuzz = 10000, fuzz_threads = 8;
  double max_growth_mib = 64.0;
};

// A Llama of the given shape with random bf16 weights (std 0.02, norms 1) and the tokenizer files
// of `tokenizer_dir` (vocabulary size, BOS/EOS and chat template from there).
void make_model(const std::string& dir, const std::string& tokenizer_dir, int hidden, int layers, int ffn) {
  std::filesystem::create_directories(dir);
  const json tiny = json::parse(std::ifstream(tokenizer_dir + "/config.json"));
  const int64_t vocab = tiny.at("vocab_size").get<int64_t>();
  const int heads = hidden / 64, kv_heads = std::max(1, heads / 4);
  const json config = {{"architectures", {"LlamaForCausalLM"}}, {"model_type", "llama"}, {"hidden_size", hidden},
                       {"intermediate_size", ffn}, {"num_hidden_layers", layers}, {"num_attention_heads", heads},
                       {"num_key_value_heads", kv_heads}, {"head_dim", 64}, {"vocab_size", vocab},
                       {"max_position_embeddings", 1024}, {"rms_norm_eps", 1e-5}, {"rope_theta", 10000.0},
                       {"bos_token_id", tiny.value("bos_token_id", 1)}, {"eos_token_id", tiny.value("eos_token_id", 2)},
                       {"tie_word_embeddings", false}, {"torch_dtype", "bfloat16"}};
  std::ofstream(dir + "/config.json") << config.dump(2);
  for (const char* f : {"tokenizer.json", "tokenizer_config.json", "generation_config.json"})
    if (std::filesystem::exists(tokenizer_dir + "/" + f))
      std::filesystem::copy_file(tokenizer_dir + "/" + f, dir + "/" + f, std::filesystem::copy_options::overwrite_existing);
  std::vector<std::pair<std::string, std::vector<int64_t>>> specs = {
      {"model.embed_tokens.weight", {vocab, hidden}}, {"lm_head.weight", {vocab, hidden}}, {"model.norm.weight", {hidden}}};
  for (int i = 0; i < layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    specs.push_back({p + "self_attn.q_proj.weight", {heads * 64, hidden}});
    specs.push_back({p + "self_attn.k_proj.weight", {kv_heads * 64, hidden}});
    specs.push_back({p + "self_attn.v_proj.weight", {kv_heads * 64, hidden}});
    specs.push_back({p + "self_attn.o_proj.weight", {hidden, heads * 64}});
    specs.push_back({p + "mlp.gate_proj.weight", {ffn, hidden}});
    specs.push_back({p + "mlp.up_proj.weight", {ffn, hidden}});
    specs.push_back({p + "mlp.down_proj.weight", {hidden, ffn}});
    specs.push_back({p + "input_layernorm.weight", {hidden}});
    specs.push_back({p + "post_attention_layernorm.weight", {hidden}});
  }
  std::mt19937 rng(42);
  std::normal_distribution<float> normal(0.0f, 0.02f);
  std::vector<std::vector<uint16_t>> storage;
  std::vector<bioquant::TensorView> views;
  for (const auto& [name, shape] : specs) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    storage.emplace_back(static_cast<size_t>(n));
    for (uint16_t& v : storage.back()) v = bioquant::f32_to_bf16(shape.size() == 1 ? 1.0f : normal(rng));
    bioquant::TensorView v;
    v.name = name;
    v.dtype = bioquant::DType::BF16;
    v.shape = shape;
    v.data = reinterpret_cast<const uint8_t*>(storage.back().data());
    v.nbytes = static_cast<size_t>(n) * 2;
    views.push_back(v);
  }
  bioquant::write_safetensors(dir + "/model.safetensors", views);
}

// `bioquant serve` started here, on a free port.
struct ServerProcess {
  pid_t pid = -1;
  int port = 0;
  std::string err_path;
};

ServerProcess start_server(const Options& o) {
  ServerProcess s;
  char tmpl[] = "/tmp/bioquant-serve-load-XXXXXX";
  const int fd = ::mkstemp(tmpl);
  if (fd < 0) throw std::runtime_error("mkstemp failed");
  ::close(fd);
  s.err_path = tmpl;
  s.pid = ::fork();
  if (s.pid == 0) {
    std::vector<std::string> args = {o.bioquant, "serve", "--model", o.model, "--port", "0"};
    if (o.threads > 0) args.insert(args.end(), {"--threads", std::to_string(o.threads)});
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    if (!std::freopen(s.err_path.c_str(), "w", stderr)) ::_exit(126);
    ::execv(o.bioquant.c_str(), argv.data());
    ::_exit(127);
  }
  for (int i = 0; i < 6000 && s.port == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    std::ifstream in(s.err_path);
    const std::string err((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const size_t at = err.find("http://127.0.0.1:");
    if (err.find("serving ") != std::string::npos && at != std::string::npos) s.port = std::atoi(err.c_str() + at + 17);
    if (err.find("error:") != std::string::npos) throw std::runtime_error("bioquant serve failed: " + err);
  }
  if (s.port == 0) throw std::runtime_error("bioquant serve did not start");
  return s;
}

// VmRSS / VmHWM of a process, in MiB (0 when unknown).
double proc_mib(int pid, const char* key) {
  if (pid <= 0) return 0.0;
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(key, 0) == 0) return std::atof(line.c_str() + std::strlen(key)) / 1024.0;
  return 0.0;
}

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p / 100.0 * static_cast<double>(v.size() - 1) + 0.5));
  return v[i];
}

const std::vector<std::string> kPrompts = {
    "What is the mechanism of action of aspirin?",
    "Name two drugs used to treat type 2 diabetes.",
    "Which gene is most often mutated in cystic fibrosis?",
    "Describe the symptoms of acute myocardial infarction.",
    "What does heparin do?",
    "List risk factors for stroke.",
    "How is tuberculosis transmitted?",
    "What is the first-line treatment of hypertension?",
};

struct RunStats {
  int ok = 0, failed = 0;
  int64_t completion_tokens = 0;
  double seconds = 0.0;
  std::vector<double> latency_ms;
  std::string first_error;
};

// `clients` threads, each sending `per_client` greedy requests one after another: chat (the prompt
// as the user turn of the chat template) or completions (the prompt continued as plain text).
RunStats run_clients(const std::string& host, int port, int clients, int per_client, int max_tokens,
                     const std::string& api) {
  RunStats total;
  std::mutex mutex;
  std::vector<std::thread> threads;
  const auto t0 = Clock::now();
  for (int c = 0; c < clients; ++c) {
    threads.emplace_back([&, c] {
      httplib::Client client(host, port);
      client.set_keep_alive(true);
      client.set_tcp_nodelay(true);
      client.set_read_timeout(600, 0);
      RunStats mine;
      for (int i = 0; i < per_client; ++i) {
        const std::string& prompt = kPrompts[(c + i) % kPrompts.size()];
        json body = {{"max_tokens", max_tokens}, {"temperature", 0}};
        if (api == "chat") body["messages"] = {{{"role", "user"}, {"content", prompt}}};
        else body["prompt"] = prompt;
        const auto start = Clock::now();
        auto r = client.Post(api == "chat" ? "/v1/chat/completions" : "/v1/completions", body.dump(), "application/json");
        const double ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
        if (r && r->status == 200) {
          ++mine.ok;
          mine.latency_ms.push_back(ms);
          mine.completion_tokens += json::parse(r->body)["usage"]["completion_tokens"].get<int64_t>();
        } else {
          ++mine.failed;
          if (mine.first_error.empty())
            mine.first_error = r ? "HTTP " + std::to_string(r->status) + ": " + r->body.substr(0, 200)
                                 : "no answer: " + httplib::to_string(r.error());
        }
      }
      std::lock_guard<std::mutex> lock(mutex);
      total.ok += mine.ok;
      total.failed += mine.failed;
      total.completion_tokens += mine.completion_tokens;
      total.latency_ms.insert(total.latency_ms.end(), mine.latency_ms.begin(), mine.latency_ms.end());
      if (total.first_error.empty()) total.first_error = mine.first_error;
    });
  }
  for (auto& t : threads) t.join();
  total.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return total;
}

json stats_json(const RunStats& s, int clients) {
  return {{"clients", clients},
          {"ok", s.ok},
          {"failed", s.failed},
          {"seconds", s.seconds},
          {"requests_per_s", s.ok / s.seconds},
          {"tokens_per_s", static_cast<double>(s.completion_tokens) / s.seconds},
          {"p50_ms", percentile(s.latency_ms, 50)},
          {"p99_ms", percentile(s.latency_ms, 99)}};
}

void print_stats(const char* name, const RunStats& s, int clients) {
  std::printf("%-12s %2d clients: %4d ok %3d failed  %7.2f req/s  %8.1f tok/s  p50 %7.1f ms  p99 %7.1f ms  (%.1f s)\n",
              name, clients, s.ok, s.failed, s.ok / s.seconds, static_cast<double>(s.completion_tokens) / s.seconds,
              percentile(s.latency_ms, 50), percentile(s.latency_ms, 99), s.seconds);
  if (!s.first_error.empty()) std::printf("  first failure: %s\n", s.first_error.c_str());
  if (std::getenv("SERVE_LOAD_TAIL")) {
    std::vector<double> v = s.latency_ms;
    std::sort(v.rbegin(), v.rend());
    std::printf("  slowest:");
    for (size_t i = 0; i < std::min<size_t>(12, v.size()); ++i) std::printf(" %.0f", v[i]);
    std::printf(" ms\n");
  }
}

// ---------------------------------------------------------------------------------------------
// Fuzz: malformed requests by construction.

struct FuzzCase {
  std::string method = "POST", path, body;
  std::string raw;  // non-empty: bytes sent on a raw socket instead
  bool partial = false;  // raw bytes that are no complete request: the sender then shuts its side
};

const std::vector<std::string> kPaths = {"/v1/completions", "/v1/chat/completions", "/v1/bionlp/ner",
                                         "/v1/bionlp/relation", "/v1/bionlp/classify", "/v1/bionlp/qa"};
const std::vector<std::string> kValid = {
    R"({"prompt": "Aspirin is", "max_tokens": 4, "temperature": 0})",
    R"({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stop": ["x"], "seed": 1})",
    R"({"text": "Exposure to VGB caused defects.", "task": "bc5cdr-chem"})",
    R"({"text": "@CHEMICAL$ inhibits @GENE$.", "task": "chemprot"})",
    R"({"text": "Masks reduce spread.", "labels": ["Prevention", "Treatment"]})",
    R"({"question": "Which?", "options": {"A": "x", "B": "y"}})"};

// Values that are wrong for the named field of a valid body.
const std::vector<std::pair<std::string, std::vector<std::string>>> kBadFields = {
    {"max_tokens", {"0", "-1", "1e9", "\"4\"", "4.5", "true", "null,\"max_tokens\":99999999", "[]", "{}"}},
    {"temperature", {"-0.1", "2.5", "\"hot\"", "[1]", "1e400"}},
    {"top_p", {"0", "1.5", "\"x\"", "-1"}},
    {"top_k", {"-5", "1.5", "\"k\"", "99999999999"}},
    {"seed", {"1.5", "\"s\"", "[]", "{}"}},
    {"stop", {"\"\"", "[\"\"]", "[1]", "[\"a\",\"b\",\"c\",\"d\",\"e\"]", "{}", "5"}},
    {"stream", {"\"yes\"", "1", "[]"}},
    {"logprobs", {"-1", "99", "\"2\"", "{}"}},
    {"n", {"2", "0", "\"1\""}},
    {"echo", {"true"}},
    {"model", {"\"gpt-4\"", "5", "[]"}},
    {"unknown_field", {"1", "\"x\"", "null,\"x\":1"}},
    {"messages", {"[]", "\"hi\"", "[{\"role\":\"tool\",\"content\":\"x\"}]", "[{\"role\":\"user\"}]",
                  "[{\"role\":\"user\",\"content\":5}]", "[{\"role\":\"user\",\"content\":[{\"type\":\"image\"}]}]", "[1]"}},
    {"prompt", {"5", "[]", "[\"a\",\"b\"]", "[1,-2]", "{}", "[[1]]"}},
    {"task", {"\"nope\"", "\"chemprot\"", "\"hoc\"", "5", "\"\""}},
    {"text", {"5", "[]", "\"\"", "{}"}},
    {"labels", {"[]", "[\"\"]", "[\"a\",\"A\"]", "\"x\"", "[1]"}},
    {"options", {"{}", "{\"a\":\"x\",\"B\":\"y\"}", "{\"A\":\"\"}", "[\"x\"]", "{\"AA\":\"x\",\"B\":\"y\"}"}},
    {"question", {"5", "[]"}},
    {"context", {"5", "[]"}},
};

FuzzCase make_case(std::mt19937_64& rng, int i) {
  FuzzCase c;
  const size_t k = rng() % kValid.size();
  c.path = kPaths[k];
  const std::string& valid = kValid[k];
  switch (i % 12) {
    case 0: {  // truncated JSON
      c.body = valid.substr(0, 1 + rng() % (valid.size() - 2));
      break;
    }
    case 1: {  // one byte changed to a structural character or garbage, rejected if still valid
      do {
        c.body = valid;
        c.body[rng() % c.body.size()] = "{}[]\":,\\\x01\xff"[rng() % 11];
      } while (json::accept(c.body));
      break;
    }
    case 2: {  // random bytes
      c.body.resize(1 + rng() % 300);
      for (char& ch : c.body) ch = static_cast<char>(rng() % 256);
      if (json::accept(c.body)) c.body = "{";
      break;
    }
    case 3:
    case 4:
    case 5: {  // a valid body with one bad field value (or an unknown field)
      const auto& [field, values] = kBadFields[rng() % kBadFields.size()];
      json j = json::parse(valid);
      const std::string value = values[rng() % values.size()];
      std::string body = j.dump();
      body.insert(body.size() - 1, std::string(j.empty() ? "" : ",") + "\"" + field + "\":" + value);
      // A duplicate key keeps the last value (nlohmann): the bad one.
      c.body = body;
      break;
    }
    case 6: {  // not an object / empty / deep
      static const std::vector<std::string> shapes = {"", "[]", "null", "42", "\"s\"", "true", "[{}]"};
      c.body = rng() % 3 == 0 ? std::string(5000, '[') + std::string(5000, ']') : shapes[rng() % shapes.size()];
      break;
    }
    case 7: {  // invalid UTF-8 inside a string
      c.body = valid;
      const size_t q = c.body.find('"', c.body.find(':'));
      c.body.insert(q + 1, rng() % 2 ? "\xc3\x28" : "\xed\xa0\x80");
      break;
    }
    case 8: {  // oversized body (413) now and then; otherwise an unknown route or a wrong method
      if (i % 120 == 8) {
        c.body = std::string((size_t(1) << 20) + 100, ' ');
      } else if (rng() % 2) {
        c.path = "/v1/" + std::to_string(rng() % 1000) + "/x";
        c.body = valid;
      } else {
        c.method = rng() % 2 ? "GET" : "PUT";
      }
      break;
    }
    case 9: {  // numbers and strings at the limits
      static const std::vector<std::string> odd = {
          R"({"prompt": "x", "max_tokens": 18446744073709551616})", R"({"prompt": "x", "temperature": 1e999})",
          R"({"prompt": "\u0000", "max_tokens": 0})", R"({"prompt": "x", "stop": ["\ud800"]})",
          R"({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 3})",
          R"({"prompt": "x", "stream_options": {"include_usage": true}})"};
      c.body = odd[rng() % odd.size()];
      c.path = c.body.find("messages") != std::string::npos ? "/v1/chat/completions" : "/v1/completions";
      break;
    }
    default: {  // raw HTTP garbage
      static const std::vector<std::string> raw = {
          "GARBAGE\r\n\r\n",
          "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n{}",
          "POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
          "GET /" + std::string(20000, 'a') + " HTTP/1.1\r\nHost: x\r\n\r\n",
          "POST /v1/completions HTTP/1.1\r\nHost: x\r\nX: " + std::string(10000, 'h') + "\r\n\r\n",
          "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  // a TLS client hello
          "POST /v1/completions HTTP/9.9\r\n\r\n",
          "POST /v1/completions HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n{}",
          "\r\n\r\n\r\n",
      };
      c.raw = raw[rng() % raw.size()];
      c.partial = c.raw[0] == '\x16';
      break;
    }
  }
  return c;
}

// Sends bytes and reads the answer's status line ("" when the server just closed). Complete requests
// keep the sending side open (httplib does not answer a peer that has shut it down); partial ones
// shut it, so the server sees the end instead of waiting for its read timeout.
std::string raw_exchange(int port, const std::string& bytes, bool partial) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return "socket";
  timeval tv{10, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  std::string status = "connect";
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) {
    ::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
    if (partial) ::shutdown(fd, SHUT_WR);  // nothing more comes: the server sees the end
    char buf[256];
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    status = n > 0 ? std::string(buf, static_cast<size_t>(n)).substr(0, 12) : "";
  }
  ::close(fd);
  return status;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app("Load and fuzz run of bioquant serve");
  app.add_option("--endpoint", o.endpoint, "a running server, e.g. http://127.0.0.1:8080 (else one is started)");
  app.add_option("--pid", o.pid, "the running server's process id (memory readings)");
  app.add_option("--model", o.model, "model to serve when starting one");
  app.add_option("--bioquant", o.bioquant, "the bioquant binary (default: this build's)");
  app.add_option("--threads", o.threads, "--threads of the started server (default: all cores)");
  app.add_option("--clients", o.clients, "load phase clients (default 32)");
  app.add_option("--requests", o.requests, "load phase requests per client (default 20)");
  app.add_option("--max-tokens", o.max_tokens, "max_tokens of every load request (default 32)");
  app.add_option("--api", o.api, "chat (default: short answers after the chat template) or completions (text continued)")
      ->check(CLI::IsMember({"chat", "completions"}));
  app.add_option("--throughput-requests", o.throughput_requests, "requests per client and round in the 1 vs 8 comparison (default 16)");
  app.add_option("--rounds", o.rounds, "rounds of the 1 vs 8 comparison (default 3)");
  app.add_option("--fuzz", o.fuzz, "malformed requests (default 10000)");
  app.add_option("--max-growth-mib", o.max_growth_mib, "allowed RSS growth over the fuzz run (default 64)");
  app.add_option("--make-model", o.make_model, "write a random-weight Llama (tokenizer of --model) here and serve it");
  app.add_option("--hidden", o.hidden, "--make-model: hidden size (default 1024)");
  app.add_option("--layers", o.layers, "--make-model: layers (default 8)");
  app.add_option("--ffn", o.ffn, "--make-model: FFN size (default 2816)");
  CLI11_PARSE(app, argc, argv);

  ServerProcess started;
  std::string host = "127.0.0.1";
  int port = 0;
  try {
    if (!o.make_model.empty()) {
      if (o.model.empty()) throw std::runtime_error("--make-model takes the tokenizer of --model DIR");
      make_model(o.make_model, o.model, o.hidden, o.layers, o.ffn);
      std::printf("made %s: hidden %d, %d layers, FFN %d, random bf16 weights\n", o.make_model.c_str(), o.hidden,
                  o.layers, o.ffn);
      o.model = o.make_model;
    }
    if (o.endpoint.empty()) {
      if (o.model.empty()) throw std::runtime_error("give --model PATH (or --endpoint URL of a running server)");
      started = start_server(o);
      port = started.port;
      o.pid = started.pid;
    } else {
      const size_t colon = o.endpoint.rfind(':');
      port = std::atoi(o.endpoint.c_str() + colon + 1);
      host = o.endpoint.substr(o.endpoint.find("://") + 3, colon - o.endpoint.find("://") - 3);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  std::printf("server %s:%d (pid %d), RSS %.1f MiB\n", host.c_str(), port, o.pid, proc_mib(o.pid, "VmRSS:"));
  bool pass = true;
  json out;

  // Warm-up, then throughput at 1 and 8 clients: rounds of one then the other, so that a change in
  // the machine's load (a shared box) hits both alike; each client sends the same requests.
  run_clients(host, port, 2, 2, o.max_tokens, o.api);
  RunStats one, eight;
  auto add = [](RunStats& total, const RunStats& r) {
    total.ok += r.ok;
    total.failed += r.failed;
    total.completion_tokens += r.completion_tokens;
    total.seconds += r.seconds;
    total.latency_ms.insert(total.latency_ms.end(), r.latency_ms.begin(), r.latency_ms.end());
    if (total.first_error.empty()) total.first_error = r.first_error;
  };
  std::vector<double> round_ratios;
  for (int round = 0; round < o.rounds; ++round) {
    const RunStats a = run_clients(host, port, 1, o.throughput_requests, o.max_tokens, o.api);
    const RunStats b = run_clients(host, port, 8, o.throughput_requests, o.max_tokens, o.api);
    add(one, a);
    add(eight, b);
    round_ratios.push_back((static_cast<double>(b.completion_tokens) / b.seconds) /
                           (static_cast<double>(a.completion_tokens) / a.seconds));
  }
  print_stats("throughput", one, 1);
  print_stats("throughput", eight, 8);
  const double ratio = (static_cast<double>(eight.completion_tokens) / eight.seconds) /
                       (static_cast<double>(one.completion_tokens) / one.seconds);
  std::printf("8 clients / 1 client token throughput: %.2fx over %d rounds (per round:", ratio, o.rounds);
  for (double r : round_ratios) std::printf(" %.2fx", r);
  std::printf(") %s\n", ratio >= 3.0 ? "(>= 3x: ok)" : "(< 3x: FAIL)");
  pass = pass && ratio >= 3.0 && one.failed == 0 && eight.failed == 0;
  out["throughput_1"] = stats_json(one, 1);
  out["throughput_8"] = stats_json(eight, 8);
  out["throughput_ratio"] = ratio;
  out["throughput_round_ratios"] = round_ratios;

  // Load.
  if (o.clients > 0) {
    const RunStats load = run_clients(host, port, o.clients, o.requests, o.max_tokens, o.api);
    print_stats("load", load, o.clients);
    pass = pass && load.failed == 0;
    out["load"] = stats_json(load, o.clients);
  }

  // Fuzz.
  const double rss_before = proc_mib(o.pid, "VmRSS:");
  std::atomic<int> next{0}, answered_4xx{0}, ok_200{0}, closed{0}, bad{0}, not_json{0};
  std::mutex mutex;
  std::string first_bad;
  double rss_max = rss_before;
  std::vector<double> rss_samples;
  std::vector<std::thread> threads;
  const auto f0 = Clock::now();
  for (int t = 0; t < o.fuzz_threads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(1000 + static_cast<uint64_t>(t));
      httplib::Client client(host, port);
      client.set_keep_alive(true);
      client.set_tcp_nodelay(true);
      client.set_read_timeout(60, 0);
      while (true) {
        // Until `fuzz` requests were refused as malformed (the odd mutation that is still valid
        // does not count).
        if (answered_4xx.load() + closed.load() >= o.fuzz) break;
        const int i = next.fetch_add(1);
        if (i >= 2 * o.fuzz) break;
        if (i % 500 == 0) {
          const double rss = proc_mib(o.pid, "VmRSS:");
          std::lock_guard<std::mutex> lock(mutex);
          rss_samples.push_back(rss);
          rss_max = std::max(rss_max, rss);
        }
        const FuzzCase c = make_case(rng, i);
        auto fail = [&](const std::string& what) {
          ++bad;
          std::lock_guard<std::mutex> lock(mutex);
          if (first_bad.empty()) first_bad = what;
        };
        if (!c.raw.empty()) {
          const std::string status = raw_exchange(port, c.raw, c.partial);
          if (status.empty()) ++closed;
          else if (status.rfind("HTTP/1.1 4", 0) == 0) ++answered_4xx;
          else fail("raw case answered \"" + status + "\"");
          continue;
        }
        httplib::Result r = c.method == "GET"   ? client.Get(c.path)
                            : c.method == "PUT" ? client.Put(c.path, c.body, "application/json")
                                                : client.Post(c.path, c.body, "application/json");
        if (!r) {
          fail(c.method + " " + c.path + ": no answer (" + httplib::to_string(r.error()) + ")");
          continue;
        }
        if (r->status >= 400 && r->status < 500) {
          ++answered_4xx;
          if (!json::accept(r->body) || !json::parse(r->body).contains("error")) ++not_json;
        } else if (r->status == 200) {
          ++ok_200;  // a mutation that is still a valid request
        } else {
          fail(c.method + " " + c.path + ": HTTP " + std::to_string(r->status) + " for " + c.body.substr(0, 120));
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  const double fuzz_s = std::chrono::duration<double>(Clock::now() - f0).count();
  const double rss_after = proc_mib(o.pid, "VmRSS:");
  httplib::Client probe(host, port);
  auto health = probe.Get("/health");
  const bool up = health && health->status == 200;
  // Load once more: still serving correctly after the fuzz.
  const RunStats after = run_clients(host, port, 4, 2, o.max_tokens, o.api);
  std::printf("fuzz: %d requests in %.1f s: %d malformed answered 4xx (%d without a JSON error body), %d closed "
              "(raw garbage), %d valid after all (200), %d wrong answers; server %s\n",
              next.load(), fuzz_s, answered_4xx.load(), not_json.load(), closed.load(), ok_200.load(), bad.load(),
              up && after.failed == 0 ? "up and serving" : "DOWN");
  if (!first_bad.empty()) std::printf("  first wrong answer: %s\n", first_bad.c_str());
  std::printf("memory: RSS %.1f MiB before fuzz, %.1f MiB max, %.1f MiB after (growth %.1f MiB), peak (VmHWM) %.1f MiB\n",
              rss_before, rss_max, rss_after, rss_after - rss_before, proc_mib(o.pid, "VmHWM:"));
  const bool bounded = o.pid <= 0 || rss_after - rss_before <= o.max_growth_mib;
  pass = pass && bad == 0 && not_json == 0 && up && after.failed == 0 && bounded &&
         answered_4xx.load() + closed.load() >= o.fuzz;
  out["fuzz"] = {{"requests", next.load()},      {"seconds", fuzz_s},         {"answered_4xx", answered_4xx.load()},
                 {"closed", closed.load()}, {"valid_200", ok_200.load()}, {"wrong", bad.load()},
                 {"not_json", not_json.load()}, {"server_up", up && after.failed == 0}};
  out["memory_mib"] = {{"rss_before_fuzz", rss_before}, {"rss_max", rss_max}, {"rss_after_fuzz", rss_after},
                       {"peak", proc_mib(o.pid, "VmHWM:")}, {"samples", rss_samples}};

  if (started.pid > 0) {
    ::kill(started.pid, SIGTERM);
    int status = 0;
    ::waitpid(started.pid, &status, 0);
    const bool clean = WIFEXITED(status) && WEXITSTATUS(status) == 0;
    std::printf("SIGTERM: server exited %s\n", clean ? "cleanly (0)" : "with an error");
    pass = pass && clean;
    out["clean_exit"] = clean;
    std::remove(started.err_path.c_str());
  }
  out["pass"] = pass;
  std::printf("%s\n%s\n", out.dump().c_str(), pass ? "PASS" : "FAIL");
  return pass ? 0 : 1;
}
