// Prompt processing + incremental decoding with the KV cache.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "bioquant/engine/sampler.h"
#include "bioquant/model/decoder.h"

namespace bioquant {

struct GenerateOptions {
  int64_t max_new_tokens = 64;
  SamplingOptions sampling;     // greedy by default
  bool stop_at_eos = true;      // stop on any of the model's EOS ids (config + generation_config)
};

struct GenerateResult {
  std::vector<int32_t> tokens;  // new tokens only (an EOS that stopped generation included)
  std::string stop_reason;      // "eos" or "length"
  double prompt_seconds = 0.0;
  double decode_seconds = 0.0;
};

// Runs `prompt` then decodes up to max_new_tokens. `on_token` (optional) sees each new id.
GenerateResult generate(Decoder& decoder, const std::vector<int32_t>& prompt, const GenerateOptions& options,
                        const std::function<void(int32_t)>& on_token = {});

}  // namespace bioquant
