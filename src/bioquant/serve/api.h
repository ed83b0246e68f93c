// The server's request contract: strict parsing of the JSON bodies of the OpenAI-compatible
// endpoints into typed requests. Anything unexpected (not JSON, not an object, nested too deep, an
// unknown field, a wrong type, a value out of range, a feature we do not implement) is an ApiError
// with a 4xx status and an OpenAI-style error body; nothing is silently ignored.
#pragma once
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "bioquant/tokenizer/chat_template.h"

namespace bioquant::serve {

// A refused request: HTTP status and the OpenAI error object {"message", "type", "param", "code"}.
class ApiError : public std::runtime_error {
 public:
  ApiError(int status, std::string type, const std::string& message, std::string param = "", std::string code = "")
      : std::runtime_error(message), status(status), type(std::move(type)), param(std::move(param)), code(std::move(code)) {}
  int status;
  std::string type;   // invalid_request_error, authentication_error, not_found_error, ...
  std::string param;  // the offending field ("" = none)
  std::string code;   // machine-readable detail ("" = none)
};
ApiError bad_request(const std::string& message, const std::string& param = "");
// {"error": {"message", "type", "param" (null when none), "code" (null when none)}}
nlohmann::json error_json(const ApiError& e);

struct ApiLimits {
  int64_t max_tokens_cap = 4096;           // the most tokens one request may ask for
  int64_t default_completion_tokens = 16;  // /v1/completions without max_tokens (OpenAI's default)
  int max_depth = 32;                      // JSON nesting
  size_t max_stop = 4;                     // stop strings per request
  size_t max_stop_bytes = 256;             // per stop string
  size_t max_messages = 1024;              // chat messages per request
  int max_logprobs = 20;                   // alternatives per token
};

// The body as a JSON object (valid UTF-8, at most max_depth levels deep). ApiError 400 otherwise.
nlohmann::json parse_body(const std::string& body, const ApiLimits& limits);

// What both generation endpoints take.
struct SamplingParams {
  std::optional<int64_t> max_tokens;  // absent: the endpoint's default
  float temperature = 1.0f;           // OpenAI's default; 0 = greedy
  float top_p = 1.0f;
  int top_k = 0;                      // extension (vLLM, llama.cpp): 0 or -1 = off
  std::optional<uint64_t> seed;       // absent: a fresh random seed
  std::vector<std::string> stop;
  bool stream = false;
  bool include_usage = false;         // stream_options.include_usage
  int logprobs = -1;                  // -1: none; k >= 0: each token's log-probability and the top k
};

// POST /v1/completions
struct CompletionRequest {
  std::string model;               // "" = not given
  std::string prompt;              // text, or
  std::vector<int32_t> prompt_ids; // token ids (non-empty when the prompt was given as ids)
  SamplingParams sampling;
};
CompletionRequest parse_completion_request(const nlohmann::json& body, const ApiLimits& limits);

// POST /v1/chat/completions
struct ChatRequest {
  std::string model;
  std::vector<ChatMessage> messages;
  SamplingParams sampling;
};
ChatRequest parse_chat_request(const nlohmann::json& body, const ApiLimits& limits);

// Reads one JSON object field by field: each read marks its key, and done() refuses any key left
// unread, so an unknown or misspelled field is an error rather than silently ignored. A JSON null
// counts as absent (OpenAI clients send explicit nulls for unset options).
class ObjectReader {
 public:
  // `where` names the object in messages ("request body", "messages[2]").
  ObjectReader(const nlohmann::json& object, std::string where);

  const nlohmann::json* get(const std::string& key);  // nullptr when absent or null
  std::optional<std::string> string(const std::string& key, size_t max_bytes, bool required = false);
  std::optional<int64_t> integer(const std::string& key, int64_t min, int64_t max);
  std::optional<double> number(const std::string& key, double min, double max);
  std::optional<bool> boolean(const std::string& key);
  // A field that only has one accepted value (features not implemented): absent or that value.
  void only(const std::string& key, const nlohmann::json& accepted, const std::string& why);
  void done() const;  // ApiError 400 naming the first unknown key

  std::string name(const std::string& key) const;  // "messages[2].role" for messages

 private:
  const nlohmann::json& object_;
  std::string where_;
  std::vector<std::string> used_;
};

}  // namespace bioquant::serve
