#include "bioquant/eval/stats.h"

#include <algorithm>
#include <cmath>
#include <random>

#include "bioquant/core/error.h"

namespace bioquant::eval {

namespace {

// Draws n example indices uniformly with replacement. Rejection sampling on the raw 64-bit output
// (values below 2^64 mod n are redrawn), so the draw is unbiased and the same on every platform.
class Resampler {
 public:
  Resampler(size_t n, uint64_t seed) : n_(n), rng_(seed), threshold_((0 - static_cast<uint64_t>(n)) % n) {}

  void draw(std::vector<size_t>& indices) {
    indices.resize(n_);
    for (size_t& i : indices) {
      uint64_t x;
      do x = rng_();
      while (x < threshold_);
      i = static_cast<size_t>(x % n_);
    }
  }

 private:
  size_t n_;
  std::mt19937_64 rng_;
  uint64_t threshold_;
};

void check_args(const char* what, size_t n, int replicates) {
  check(n > 0, std::string(what) + ": no examples to resample (n = 0)");
  check(replicates >= 1, std::string(what) + ": replicates must be at least 1 (got " + std::to_string(replicates) + ")");
}

// numpy.percentile's default ("linear"): v sorted, q in [0, 1].
double quantile(const std::vector<double>& v, double q) {
  const double h = static_cast<double>(v.size() - 1) * q;
  const size_t lo = static_cast<size_t>(std::floor(h));
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (h - static_cast<double>(lo)) * (v[hi] - v[lo]);
}

Interval percentile_interval(std::vector<double> values, double level) {
  std::sort(values.begin(), values.end());
  const double tail = (1 - level) / 2;
  return {quantile(values, tail), quantile(values, 1 - tail)};
}

// The percentile CI of paired differences d* and the two-sided p-value of compare_paired.
void summarize_differences(std::vector<double> diffs, Interval& ci, double& p_value) {
  int64_t at_most_0 = 0, at_least_0 = 0;
  for (const double d : diffs) {
    at_most_0 += d <= 0 ? 1 : 0;
    at_least_0 += d >= 0 ? 1 : 0;
  }
  const double replicates = static_cast<double>(diffs.size());
  ci = percentile_interval(std::move(diffs), 0.95);
  const double tail = static_cast<double>(std::min(at_most_0, at_least_0) + 1) / (replicates + 1);
  p_value = std::min(1.0, 2 * tail);
}

}  // namespace

Interval bootstrap_ci(size_t n, const std::function<double(const std::vector<size_t>&)>& score, int replicates,
                      uint64_t seed, double level) {
  check_args("bootstrap_ci", n, replicates);
  check(level > 0 && level < 1, "bootstrap_ci: level must be in (0, 1) (got " + std::to_string(level) + ")");
  Resampler resampler(n, seed);
  std::vector<size_t> indices;
  std::vector<double> values;
  values.reserve(static_cast<size_t>(replicates));
  for (int r = 0; r < replicates; ++r) {
    resampler.draw(indices);
    const double s = score(indices);
    check(!std::isnan(s), "bootstrap_ci: the score of replicate " + std::to_string(r) + " is NaN");
    values.push_back(s);
  }
  return percentile_interval(std::move(values), level);
}

Interval metric_ci(MetricKind kind, const std::vector<std::string>& label_set, const std::vector<Gold>& gold,
                   const std::vector<Prediction>& pred, int replicates, uint64_t seed) {
  check_args("metric_ci", gold.size(), replicates);
  const MetricTable table(kind, label_set, gold, pred);
  return bootstrap_ci(
      table.size(), [&table](const std::vector<size_t>& idx) { return table.score(idx); }, replicates, seed);
}

PairedComparison compare_paired(MetricKind kind, const std::vector<std::string>& label_set,
                                const std::vector<Gold>& gold, const std::vector<Prediction>& a,
                                const std::vector<Prediction>& b, int replicates, uint64_t seed) {
  check(a.size() == b.size(), "compare_paired: run a has " + std::to_string(a.size()) + " predictions, run b " +
                                  std::to_string(b.size()));
  check_args("compare_paired", gold.size(), replicates);
  const MetricTable ta(kind, label_set, gold, a);  // (also checks gold.size() == a.size())
  const MetricTable tb(kind, label_set, gold, b);
  const size_t n = ta.size();

  PairedComparison out;
  out.n = static_cast<int64_t>(n);
  out.score_a = ta.result().score;
  out.score_b = tb.result().score;
  out.diff = out.score_b - out.score_a;
  for (size_t i = 0; i < n; ++i) {
    const bool ra = ta.correct(i), rb = tb.correct(i);
    if (ra && rb) {
      ++out.both_right;
    } else if (!ra && !rb) {
      ++out.both_wrong;
    } else if (ra) {
      ++out.right_to_wrong;
      out.right_to_wrong_indices.push_back(i);
    } else {
      ++out.wrong_to_right;
      out.wrong_to_right_indices.push_back(i);
    }
  }

  Resampler resampler(n, seed);
  std::vector<size_t> indices;
  std::vector<double> diffs;
  diffs.reserve(static_cast<size_t>(replicates));
  for (int r = 0; r < replicates; ++r) {
    resampler.draw(indices);
    diffs.push_back(tb.score(indices) - ta.score(indices));
  }
  summarize_differences(std::move(diffs), out.ci, out.p_value);
  return out;
}

MeanDifference compare_paired_mean(const std::vector<PairedTask>& tasks, int replicates, uint64_t seed) {
  check(!tasks.empty(), "compare_paired_mean: no tasks");
  MeanDifference out;
  std::vector<double> sums(static_cast<size_t>(std::max(replicates, 0)), 0.0);
  for (size_t k = 0; k < tasks.size(); ++k) {
    const PairedTask& t = tasks[k];
    check(t.a.size() == t.b.size(), "compare_paired_mean: run a has " + std::to_string(t.a.size()) +
                                        " predictions of a task, run b " + std::to_string(t.b.size()));
    check_args("compare_paired_mean", t.gold.size(), replicates);
    const MetricTable ta(t.kind, t.label_set, t.gold, t.a);
    const MetricTable tb(t.kind, t.label_set, t.gold, t.b);
    out.diff += tb.result().score - ta.result().score;
    out.n += static_cast<int64_t>(ta.size());
    Resampler resampler(ta.size(), seed + k);
    std::vector<size_t> indices;
    for (double& sum : sums) {
      resampler.draw(indices);
      sum += tb.score(indices) - ta.score(indices);
    }
  }
  const double count = static_cast<double>(tasks.size());
  out.diff /= count;
  for (double& sum : sums) sum /= count;
  summarize_differences(std::move(sums), out.ci, out.p_value);
  return out;
}

}  // namespace bioquant::eval
