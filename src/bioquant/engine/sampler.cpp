#include "bioquant/engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>

#include "bioquant/core/error.h"
#include "bioquant/model/decoder.h"

namespace bioquant {

void sort_by_logit(const float* values, int64_t n, std::vector<uint64_t>& order, std::vector<uint64_t>& scratch) {
  order.resize(static_cast<size_t>(n));
  scratch.resize(static_cast<size_t>(n));
  // Key: the float's bits mapped so that larger values get smaller keys (-0 as +0: they compare equal),
  // above the id; ids enter in increasing order and each pass is stable, so equal keys keep it.
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, &values[i], sizeof u);
    if (u == 0x80000000u) u = 0;
    const uint32_t ascending = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    order[static_cast<size_t>(i)] = (static_cast<uint64_t>(~ascending) << 32) | static_cast<uint32_t>(i);
  }
  constexpr int kBits = 11, kBuckets = 1 << kBits;
  std::vector<uint32_t> count(kBuckets);
  for (int shift = 32; shift < 64; shift += kBits) {  // the key's 32 bits: three passes
    std::fill(count.begin(), count.end(), 0u);
    for (const uint64_t e : order) ++count[(e >> shift) & (kBuckets - 1)];
    uint32_t start = 0;
    for (uint32_t& c : count) start += std::exchange(c, start);
    for (const uint64_t e : order) scratch[count[(e >> shift) & (kBuckets - 1)]++] = e;
    order.swap(scratch);
  }
}

Sampler::Sampler(const SamplingOptions& options) : options_(options), rng_(options.seed) {
  check(options.temperature >= 0.0f, "temperature must be >= 0");
  check(options.top_k >= 0, "top-k must be >= 0");
  check(options.top_p > 0.0f && options.top_p <= 1.0f, "top-p must be in (0, 1]");
}

int32_t Sampler::sample(const float* logits, int64_t n) {
  if (options_.temperature == 0.0f) return top_token(logits, n);
  candidates_.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) candidates_[i] = {logits[i] / options_.temperature, static_cast<int32_t>(i)};
  auto by_logit = [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); };
  size_t keep = candidates_.size();
  if (options_.top_k > 0 && static_cast<size_t>(options_.top_k) < keep) {
    keep = static_cast<size_t>(options_.top_k);
    std::partial_sort(candidates_.begin(), candidates_.begin() + keep, candidates_.end(), by_logit);
  } else {  // the by_logit order of every candidate (std::sort took ~10 ms a token for 128K)
    scaled_.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) scaled_[static_cast<size_t>(i)] = candidates_[static_cast<size_t>(i)].first;
    sort_by_logit(scaled_.data(), n, order_, scratch_);
    for (size_t i = 0; i < keep; ++i) {
      const auto id = static_cast<size_t>(order_[i] & 0xFFFFFFFFu);
      candidates_[i] = {scaled_[id], static_cast<int32_t>(id)};
    }
  }
  candidates_.resize(keep);
  const float m = candidates_.front().first;
  double total = 0.0;
  std::vector<double>& probs = probs_;
  probs.resize(keep);
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
