#include "bioquant/engine/generator.h"

#include <algorithm>
#include <chrono>

#include "bioquant/core/error.h"
#include "bioquant/kernels/cuda/gpu_decoder.h"

namespace bioquant {

GenerateResult generate(Decoder& decoder, const std::vector<int32_t>& prompt, const GenerateOptions& options,
                        const std::function<void(int32_t)>& on_token) {
  const ModelConfig& c = decoder.model().config();
  check(!prompt.empty(), "generate: empty prompt");
  check(options.max_new_tokens >= 0, "generate: max_new_tokens must be >= 0");
  GenerateResult result;
  result.stop_reason = "length";
  KVCache cache(c, static_cast<int64_t>(prompt.size()) + std::max<int64_t>(options.max_new_tokens, 1));
  Sampler sampler(options.sampling);
  // Greedy decoding takes each step's top token from the decoder (on a GPU, computed there); sampling
  // takes the logits (page-locked on a GPU: see HostFloats).
  const bool greedy = options.sampling.temperature == 0.0f;
  HostFloats logits(greedy ? 0 : static_cast<size_t>(c.vocab), decoder.gpu() != nullptr);
  int32_t top = -1;
  const auto step = [&](const int32_t* ids, int64_t n) {
    const DecodeSegment segment{ids, n, &cache, 1, greedy ? nullptr : logits.data(), greedy ? &top : nullptr};
    decoder.forward_batch(std::span<const DecodeSegment>(&segment, 1));
  };
  using Clock = std::chrono::steady_clock;
  auto t0 = Clock::now();
  step(prompt.data(), static_cast<int64_t>(prompt.size()));
  auto t1 = Clock::now();
  result.prompt_seconds = std::chrono::duration<double>(t1 - t0).count();
  for (int64_t i = 0; i < options.max_new_tokens; ++i) {
    const int32_t next = greedy ? top : sampler.sample(logits.data(), c.vocab);
    result.tokens.push_back(next);
    if (on_token) on_token(next);
    if (options.stop_at_eos && std::find(c.eos_ids.begin(), c.eos_ids.end(), next) != c.eos_ids.end()) {
      result.stop_reason = "eos";
      break;
    }
    if (i + 1 == options.max_new_tokens) break;
    step(&next, 1);
  }
  result.decode_seconds = std::chrono::duration<double>(Clock::now() - t1).count();
  return result;
}

}  // namespace bioquant
