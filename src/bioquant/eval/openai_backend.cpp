#include "bioquant/eval/openai_backend.h"

#include <chrono>
#include <thread>

#include <httplib.h>
#include <nlohmann/json.hpp>

#include "bioquant/core/error.h"

namespace bioquant::eval {

using nlohmann::json;

struct OpenAIBackend::Impl {
  std::unique_ptr<httplib::Client> client;
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
  impl_->client = std::make_unique<httplib::Client>(host);
  impl_->client->set_connection_timeout(10);
  impl_->client->set_read_timeout(options_.timeout_seconds);
  impl_->client->set_write_timeout(60);
  if (!options_.api_key.empty()) impl_->client->set_bearer_token_auth(options_.api_key);
}

OpenAIBackend::~OpenAIBackend() = default;

std::string OpenAIBackend::describe() const {
  return "openai-compatible server " + options_.endpoint + (options_.model.empty() ? "" : " (" + options_.model + ")");
}

std::string OpenAIBackend::generate(const std::string& prompt, int max_new_tokens) {
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
    auto res = impl_->client->Post(path, payload, "application/json");
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
    check(res->status == 200, options_.endpoint + ": HTTP " + std::to_string(res->status) + ": " + snippet);
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
    counters_.prompts += 1;
    if (answer.contains("usage") && answer["usage"].is_object()) {
      const json& u = answer["usage"];
      if (u.contains("prompt_tokens") && u["prompt_tokens"].is_number_integer())
        counters_.prompt_tokens_computed += u["prompt_tokens"].get<int64_t>();
      if (u.contains("completion_tokens") && u["completion_tokens"].is_number_integer())
        counters_.generated_tokens += u["completion_tokens"].get<int64_t>();
    }
    if (options_.chat) {
      check(choice->contains("message") && (*choice)["message"].is_object(),
            options_.endpoint + ": choices[0] has no message: " + snippet);
      const json& content = (*choice)["message"].value("content", json());
      return content.is_string() ? content.get<std::string>() : "";  // null content = empty answer
    }
    const json& text = choice->value("text", json());
    return text.is_string() ? text.get<std::string>() : "";
  }
  throw Error("openai backend: " + last_error);
}

}  // namespace bioquant::eval
