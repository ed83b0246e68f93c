// Next-token choice: greedy (temperature 0, the default) or seeded sampling with
// temperature, top-k and top-p (applied in that order, as HF transformers does).
#pragma once
#include <cstdint>
#include <random>
#include <vector>

namespace bioquant {

struct SamplingOptions {
  float temperature = 0.0f;  // 0: greedy
  int top_k = 0;             // 0: off
  float top_p = 1.0f;        // 1: off
  uint64_t seed = 0;         // recorded so a sampled run can be repeated
};

class Sampler {
 public:
  explicit Sampler(const SamplingOptions& options);
  int32_t sample(const float* logits, int64_t n_vocab);

 private:
  SamplingOptions options_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> candidates_;
};

int32_t argmax(const float* values, int64_t n);  // first index of the maximum

}  // namespace bioquant
