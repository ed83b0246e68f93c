#include "bioquant/eval/openai_backend.h"

#include <chrono>
#include <exception>
#include <thread>

#include <httplib.h>
#include <nlohmann/json.hpp>

#include "bioquant/core/error.h"

namespace bioquant::eval {

using nlohmann::json;

struct OpenAIBackend::Impl {
  std::string host;       // scheme://host[:port]
  std::string base_path;  // e.g. "/v1"
};

OpenAIBackend::OpenAIBackend(OpenAIOptions options) : options_(std::move(options)), impl_(std::make_unique<Impl>()) {
  const std::string& url = options_.endpoint;
  const size_t scheme_end = url.find("://");
  check(scheme_end != std::string::npos && (url.rfind("http://", 0) == 0 || url.rfind("https://", 0) == 0),
        "--endpoint must be an http:// or https:// URL, got \"" + url + "\"");
  const size_t path_start = url.find('/', scheme_end + 3);
  const std::string host = url.substr(0, path_start);
  impl_->base_path = path_start == std::string::npos ? "" : url.substr(path_start);
  while (!impl_->base_path.empty() && impl_->base_path.back() == '/') impl_->base_path.pop_back();
  check(host.size() > scheme_end + 3, "--endpoint has no host: \"" + url + "\"");
  impl_->host = host;
}

OpenAIBackend::~OpenAIBackend() = default;

std::string OpenAIBackend::describe() const {
  return "openai-compatible server " + options_.endpoint + (options_.model.empty() ? "" : " (" + options_.model + ")");
}

void OpenAIBackend::count(const Answer& a) {
  counters_.prompts += 1;
  counters_.prompt_tokens_computed += a.prompt_tokens;
  counters_.generated_tokens += a.completion_tokens;
}

std::string OpenAIBackend::generate(const std::string& prompt, int max_new_tokens) {
  const Answer a = request(prompt, max_new_tokens);
  count(a);
  return a.text;
}

std::vector<std::string> OpenAIBackend::generate_batch(const std::vector<std::string>& prompts, int max_new_tokens) {
  if (prompts.size() <= 1) return Backend::generate_batch(prompts, max_new_tokens);
  std::vector<Answer> answers(prompts.size());
  std::vector<std::exception_ptr> errors(prompts.size());
  std::vector<std::thread> threads;
  threads.reserve(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i)
    threads.emplace_back([&, i] {
      try {
        answers[i] = request(prompts[i], max_new_tokens);
      } catch (...) {
        errors[i] = std::current_exception();
      }
    });
  for (std::thread& t : threads) t.join();
  for (const std::exception_ptr& e : errors)
    if (e) std::rethrow_exception(e);
  std::vector<std::string> texts;
  for (const Answer& a : answers) {
    count(a);
    texts.push_back(a.text);
  }
  return texts;
}

OpenAIBackend::Answer OpenAIBackend::request(const std::string& prompt, int max_new_tokens) const {
  httplib::Client client(impl_->host);
  client.set_connection_timeout(10);
  client.set_read_timeout(options_.timeout_seconds);
  client.set_write_timeout(60);
  if (!options_.api_key.empty()) client.set_bearer_token_auth(options_.api_key);
  json body = {{"model", options_.model.empty() ? "default" : options_.model},
               {"max_tokens", max_new_tokens},
               {"temperature", 0},
               {"stream", false}};
  std::string path = impl_->base_path;
  if (options_.chat) {
    body["messages"] = json::array({{{"role", "user"}, {"content", prompt}}});
    path += "/chat/completions";
  } else {
    body["prompt"] = prompt;
    path += "/completions";
  }
  const std::string payload = body.dump();
  std::string last_error;
  for (int attempt = 0; attempt <= options_.retries; ++attempt) {
    if (attempt > 0) std::this_thread::sleep_for(std::chrono::milliseconds(500 * attempt));
    auto res = client.Post(path, payload, "application/json");
    if (!res) {
      last_error = "cannot reach " + options_.endpoint + " (" + httplib::to_string(res.error()) + ")";
      continue;
    }
    if (res->status == 429 || res->status >= 500) {
      last_error = options_.endpoint + path.substr(impl_->base_path.size()) + " answered HTTP " + std::to_string(res->status);
      continue;
    }
    std::string snippet = res->body.substr(0, 200);
    for (char& c : snippet)
      if (c == '\n' || c == '\r') c = ' ';
    // A base URL without /v1 is the usual slip: the servers answer 404 under the bare host.
    const std::string& base = impl_->base_path;
    std::string hint;
    if (res->status == 404 && (base.size() < 3 || base.compare(base.size() - 3, 3, "/v1") != 0))
      hint = " (OpenAI-compatible servers answer under /v1: try --endpoint " + options_.endpoint +
             (options_.endpoint.back() == '/' ? "v1)" : "/v1)");
    check(res->status == 200, options_.endpoint + ": HTTP " + std::to_string(res->status) + ": " + snippet + hint);
    json answer;
    try {
      answer = json::parse(res->body);
    } catch (const json::exception&) {
      throw Error(options_.endpoint + ": the answer is not JSON: " + snippet);
    }
    const json* choice = nullptr;
    if (answer.is_object() && answer.contains("choices") && answer["choices"].is_array() && !answer["choices"].empty())
      choice = &answer["choices"][0];
    check(choice && choice->is_object(), options_.endpoint + ": the answer has no choices[0]: " + snippet);
    Answer out;
    if (answer.contains("usage") && answer["usage"].is_object()) {
      const json& u = answer["usage"];
      if (u.contains("prompt_tokens") && u["prompt_tokens"].is_number_integer())
        out.prompt_tokens = u["prompt_tokens"].get<int64_t>();
      if (u.contains("completion_tokens") && u["completion_tokens"].is_number_integer())
        out.completion_tokens = u["completion_tokens"].get<int64_t>();
    }
    if (options_.chat) {
      check(choice->contains("message") && (*choice)["message"].is_object(),
            options_.endpoint + ": choices[0] has no message: " + snippet);
      const json& content = (*choice)["message"].value("content", json());
      if (content.is_string()) out.text = content.get<std::string>();  // null content = empty answer
      return out;
    }
    const json& text = choice->value("text", json());
    if (text.is_string()) out.text = text.get<std::string>();
    return out;
  }
  throw Error("openai backend: " + last_error);
}

}  // namespace bioquant::eval
