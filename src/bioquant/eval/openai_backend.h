// Answers from a model served by any OpenAI-compatible server (vLLM, llama.cpp server, Ollama, TGI):
// POST {endpoint}/chat/completions (or /completions without a chat template), greedy (temperature 0).
// The way to evaluate models larger than this machine; free-text (generate) scoring only.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "bioquant/eval/backend.h"

namespace bioquant::eval {

struct OpenAIOptions {
  std::string endpoint;      // base URL, e.g. http://127.0.0.1:8000/v1
  std::string model;         // the server's model name ("" = let the server pick; sent as "default")
  bool chat = true;          // /chat/completions with one user message; false: /completions with the raw prompt
  std::string api_key;       // sent as "Authorization: Bearer ..." when non-empty ($OPENAI_API_KEY by default)
  int timeout_seconds = 600; // per request
  int retries = 2;           // on connection errors and 5xx/429 answers
};

class OpenAIBackend : public Backend {
 public:
  explicit OpenAIBackend(OpenAIOptions options);
  ~OpenAIBackend() override;
  std::string describe() const override;
  std::string generate(const std::string& prompt, int max_new_tokens) override;
  // The prompts as concurrent requests (a connection each), so a server that batches (vLLM,
  // bioquant serve) decodes them together; answers in the prompts' order, the first error thrown
  // once all have finished.
  std::vector<std::string> generate_batch(const std::vector<std::string>& prompts, int max_new_tokens) override;

 private:
  struct Answer {
    std::string text;
    int64_t prompt_tokens = 0, completion_tokens = 0;
  };
  Answer request(const std::string& prompt, int max_new_tokens) const;  // a connection of its own
  void count(const Answer& a);
  struct Impl;
  OpenAIOptions options_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace bioquant::eval
