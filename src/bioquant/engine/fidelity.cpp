#include "bioquant/engine/fidelity.h"

#include <algorithm>
#include <cmath>

#include "bioquant/core/error.h"
#include "bioquant/model/decoder.h"

namespace bioquant {

namespace {

// log-softmax in double.
void log_softmax(const float* x, int64_t n, std::vector<double>& out) {
  out.resize(static_cast<size_t>(n));
  double m = x[0];
  for (int64_t i = 1; i < n; ++i) m = std::max(m, static_cast<double>(x[i]));
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(static_cast<double>(x[i]) - m);
  const double lse = m + std::log(sum);
  for (int64_t i = 0; i < n; ++i) out[static_cast<size_t>(i)] = static_cast<double>(x[i]) - lse;
}

}  // namespace

double kl_divergence(const float* logits_p, const float* logits_q, int64_t n) {
  std::vector<double> lp, lq;
  log_softmax(logits_p, n, lp);
  log_softmax(logits_q, n, lq);
  double kl = 0;
  for (int64_t i = 0; i < n; ++i) kl += std::exp(lp[static_cast<size_t>(i)]) * (lp[static_cast<size_t>(i)] - lq[static_cast<size_t>(i)]);
  return std::max(0.0, kl);
}

FidelityStats compare_models(Decoder& base, Decoder& model, const std::vector<int32_t>& tokens, int64_t chunk,
                             int32_t bos, const std::function<void(int64_t, int64_t)>& progress) {
  const int64_t vocab = base.model().config().vocab;
  check(model.model().config().vocab == vocab, "the two models have different vocabularies");
  check(chunk >= 2, "chunk must be at least 2 tokens");
  check(tokens.size() >= 2, "need at least 2 tokens to compare");
  std::vector<double> klds;
  int64_t same = 0, scored = 0;
  double nll_base = 0, nll_model = 0;
  std::vector<double> lp, lq;
  const int64_t body = bos >= 0 ? chunk - 1 : chunk;
  for (size_t start = 0; start < tokens.size(); start += static_cast<size_t>(body)) {
    std::vector<int32_t> ids;
    if (bos >= 0) ids.push_back(bos);
    const size_t end = std::min(tokens.size(), start + static_cast<size_t>(body));
    ids.insert(ids.end(), tokens.begin() + static_cast<std::ptrdiff_t>(start), tokens.begin() + static_cast<std::ptrdiff_t>(end));
    const int64_t n = static_cast<int64_t>(ids.size());
    if (n < 2) break;
    std::vector<float> a(static_cast<size_t>(n * vocab)), b(a.size());
    KVCache ca(base.model().config(), n), cb(model.model().config(), n);
    base.forward(ids.data(), n, ca, n, a.data());
    model.forward(ids.data(), n, cb, n, b.data());
    for (int64_t t = 0; t < n; ++t) {
      const float* pa = a.data() + t * vocab;
      const float* pb = b.data() + t * vocab;
      log_softmax(pa, vocab, lp);
      log_softmax(pb, vocab, lq);
      double kl = 0;
      for (int64_t i = 0; i < vocab; ++i) kl += std::exp(lp[static_cast<size_t>(i)]) * (lp[static_cast<size_t>(i)] - lq[static_cast<size_t>(i)]);
      klds.push_back(std::max(0.0, kl));
      same += top_token(pa, vocab) == top_token(pb, vocab);
      if (t + 1 < n) {
        nll_base -= lp[static_cast<size_t>(ids[static_cast<size_t>(t + 1)])];
        nll_model -= lq[static_cast<size_t>(ids[static_cast<size_t>(t + 1)])];
        ++scored;
      }
    }
    if (progress) progress(static_cast<int64_t>(end), static_cast<int64_t>(tokens.size()));
  }
  FidelityStats s;
  s.positions = static_cast<int64_t>(klds.size());
  double sum = 0;
  for (double k : klds) sum += k;
  s.kld_mean = sum / static_cast<double>(klds.size());
  std::vector<double> sorted = klds;
  std::sort(sorted.begin(), sorted.end());
  s.kld_median = sorted[sorted.size() / 2];
  s.kld_p99 = sorted[std::min(sorted.size() - 1, static_cast<size_t>(0.99 * static_cast<double>(sorted.size())))];
  s.kld_max = sorted.back();
  s.same_top_rate = static_cast<double>(same) / static_cast<double>(klds.size());
  s.ppl_base = std::exp(nll_base / static_cast<double>(scored));
  s.ppl_model = std::exp(nll_model / static_cast<double>(scored));
  return s;
}

}  // namespace bioquant
