#include "bioquant/engine/sampler.h"

#include <algorithm>
#include <cmath>

#include "bioquant/core/error.h"
#include "bioquant/model/decoder.h"

namespace bioquant {

int32_t argmax(const float* values, int64_t n) { return top_token(values, n); }

Sampler::Sampler(const SamplingOptions& options) : options_(options), rng_(options.seed) {
  check(options.temperature >= 0.0f, "temperature must be >= 0");
  check(options.top_k >= 0, "top-k must be >= 0");
  check(options.top_p > 0.0f && options.top_p <= 1.0f, "top-p must be in (0, 1]");
}

int32_t Sampler::sample(const float* logits, int64_t n) {
  if (options_.temperature == 0.0f) return argmax(logits, n);
  candidates_.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) candidates_[i] = {logits[i] / options_.temperature, static_cast<int32_t>(i)};
  auto by_logit = [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); };
  size_t keep = candidates_.size();
  if (options_.top_k > 0 && static_cast<size_t>(options_.top_k) < keep) {
    keep = static_cast<size_t>(options_.top_k);
    std::partial_sort(candidates_.begin(), candidates_.begin() + keep, candidates_.end(), by_logit);
  } else {
    std::sort(candidates_.begin(), candidates_.end(), by_logit);
  }
  candidates_.resize(keep);
  const float m = candidates_.front().first;
  double total = 0.0;
  std::vector<double> probs(keep);
  for (size_t i = 0; i < keep; ++i) total += probs[i] = std::exp(static_cast<double>(candidates_[i].first - m));
  if (options_.top_p < 1.0f) {  // smallest prefix whose mass reaches top_p (at least one token)
    double mass = 0.0;
    size_t cut = 0;
    while (cut < keep) {
      mass += probs[cut++] / total;
      if (mass >= options_.top_p) break;
    }
    keep = cut;
    total = 0.0;
    for (size_t i = 0; i < keep; ++i) total += probs[i];
  }
  std::uniform_real_distribution<double> uniform(0.0, total);
  double r = uniform(rng_);
  for (size_t i = 0; i < keep; ++i) {
    r -= probs[i];
    if (r <= 0.0) return candidates_[i].second;
  }
  return candidates_[keep - 1].second;
}

}  // namespace bioquant
