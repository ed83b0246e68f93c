// Uncertainty of benchmark scores: percentile bootstrap confidence intervals over examples, and the
// paired bootstrap comparison of two runs on the same examples (a base model and its quantized self).
//
// Resampling is reproducible everywhere: indices are drawn from std::mt19937_64 (fully specified by
// the standard) by rejection sampling, not std::uniform_int_distribution (whose algorithm differs
// between standard libraries). Percentiles interpolate linearly between order statistics, like
// numpy.percentile's default: the q-quantile of sorted values v[0..B-1] is v[h] at h = (B-1)q.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "bioquant/eval/metrics.h"
#include "bioquant/eval/types.h"

namespace bioquant::eval {

struct Interval {
  double low = 0, high = 0;
};

// Percentile bootstrap: resamples example indices 0..n-1 with replacement `replicates` times (each
// replicate is n indices), calls score(indices) on each and returns the (1-level)/2 and
// 1-(1-level)/2 percentiles of the scores. n == 1 gives the degenerate interval of that one example.
// Throws bioquant::Error for n == 0, replicates < 1, level outside (0, 1), or a NaN score.
Interval bootstrap_ci(size_t n, const std::function<double(const std::vector<size_t>&)>& score,
                      int replicates = 1000, uint64_t seed = 1234, double level = 0.95);

// 95% CI of compute_metric(kind, label_set, gold, pred).score over resampled examples. Identical to
// bootstrap_ci(n, <compute_metric on the resampled examples>, replicates, seed), but each replicate is
// O(n) integer additions over precomputed per-example counts (MetricTable).
Interval metric_ci(MetricKind kind, const std::vector<std::string>& label_set, const std::vector<Gold>& gold,
                   const std::vector<Prediction>& pred, int replicates = 1000, uint64_t seed = 1234);

struct PairedComparison {
  double score_a = 0, score_b = 0, diff = 0;  // diff = b - a
  Interval ci;                                // 95% paired bootstrap CI of the difference
  double p_value = 1;                         // two-sided bootstrap p-value of diff != 0 (see compare_paired)
  int64_t n = 0, both_right = 0, both_wrong = 0, right_to_wrong = 0, wrong_to_right = 0;  // by per_example_correct
  std::vector<size_t> right_to_wrong_indices, wrong_to_right_indices;                    // ascending
};

// Compares run b against run a on the same examples. Each replicate resamples example indices once
// (same draw as bootstrap_ci with this seed) and scores both runs on them: d* = score_b* - score_a*.
// ci = 95% percentile interval of d*.
// p_value: the two-sided percentile-bootstrap p-value, i.e. the smallest alpha at which the
// equal-tailed (1 - alpha) percentile interval of d* would exclude 0:
//     p = min(1, 2 * min(#{d* <= 0} + 1, #{d* >= 0} + 1) / (B + 1))
// with B replicates. The +1 (the observed sample counted as one replicate, Davison & Hinkley) keeps p
// above 0: its floor is 2/(B+1), so 1000 replicates resolve p down to about 0.002. Replicates with
// d* == 0 count in both tails (conservative for discrete scores); identical runs give p = 1.
// Throws bioquant::Error when the three vectors differ in size or are empty.
PairedComparison compare_paired(MetricKind kind, const std::vector<std::string>& label_set,
                                const std::vector<Gold>& gold, const std::vector<Prediction>& a,
                                const std::vector<Prediction>& b, int replicates = 1000, uint64_t seed = 1234);

// Two runs on several tasks, for comparing their mean score over the tasks (as `recommend` ranks).
struct PairedTask {
  MetricKind kind = MetricKind::accuracy;
  std::vector<std::string> label_set;
  std::vector<Gold> gold;
  std::vector<Prediction> a, b;  // the same examples, in gold's order
};
struct MeanDifference {
  double diff = 0;     // mean over the tasks of score_b - score_a
  Interval ci;         // its 95% paired bootstrap CI
  double p_value = 1;  // as compare_paired's
  int64_t n = 0;       // examples over all tasks
};
// The paired bootstrap of the mean over tasks of score_b - score_a, stratified by task: each replicate
// resamples every task's examples on their own (task k from seed + k, so a single task draws exactly
// as compare_paired does) and takes the mean of the tasks' differences. Throws bioquant::Error for no
// tasks or a task compare_paired would refuse.
MeanDifference compare_paired_mean(const std::vector<PairedTask>& tasks, int replicates = 1000, uint64_t seed = 1234);

}  // namespace bioquant::eval
