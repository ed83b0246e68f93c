// `bioquant recommend --budget 40GiB`: which (model, precision) to deploy within a memory budget.
//
// Candidates are the (model, precision) pairs of the results database (plus any extra pairs asked
// for, which have no scores). A pair's score is the mean over the requested tasks of its latest
// measured score per task (with --method best: the best method measured for that task). Its memory
// is the measured peak (the largest peak_rss_bytes of its runs), else the estimate from the model's
// config.json (report/estimate.h). Pairs that fit are ranked by score (ties: less memory first,
// then name); every other pair is listed with the reason it was left out.
// Each ranked pair after the first is compared with the first: the paired bootstrap of the change in
// mean score over the tasks' shared examples (eval::compare_paired_mean on the runs' samples files,
// tasks in name order as compare-runs takes them), "within noise" when its 95% CI holds 0. Of the
// pairs within noise of the first, the one needing the least memory is named when it needs less.
#pragma once
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "bioquant/eval/stats.h"

namespace bioquant::report {

struct RecommendOptions {
  double budget_bytes = 0;
  std::vector<std::string> tasks;  // empty = every task in the database
  std::string method = "best";     // a method name, or best (per task, the best one measured)
  int64_t ctx = 4096;              // KV-cache positions for estimated memory
  // Whose memory the budget is: "cpu" (the runs' peak RSS; estimates for the CPU engine), "cuda" (the
  // GPU's peak use of runs made on a GPU; estimates for the GPU), or "auto": where the measured runs
  // ran (an error when some ran on the CPU and some on a GPU; cpu when none was measured).
  std::string device = "auto";
  // Pairs without runs to consider too (their memory is estimated; they cannot be ranked).
  std::vector<std::pair<std::string, std::string>> extra_pairs;  // (model path, precision)
  int bootstrap = 1000;  // replicates of the comparison with the first pair
  uint64_t seed = 1234;
};

struct Candidate {
  std::string model, model_name, precision;
  std::map<std::string, double> task_scores;        // task -> score used
  std::map<std::string, std::string> task_methods;  // task -> method that gave it
  std::map<std::string, int64_t> task_row_ids;      // task -> runs-table id of that score
  std::optional<double> mean_score;
  std::optional<double> memory_bytes;
  std::string memory_source;  // "measured", "estimated" or "" (unknown)
  bool fits = false;
  int rank = 0;               // 1-based among the ranked; 0 = excluded
  std::string reason;         // why chosen, ranked where it is, or excluded
  // Ranked after the first: the change in mean score against the first (this one's minus the first's).
  std::optional<eval::MeanDifference> vs_best;
  bool within_noise = false;  // vs_best's CI holds 0 (on at least kMinPairedExamples examples a task)
  std::string untested;       // why vs_best is missing (no samples file, too few shared examples)
};

struct Recommendation {
  std::string device;               // whose memory the budget is (RecommendOptions::device)
  std::vector<std::string> tasks;
  std::vector<Candidate> ranked;    // best first
  std::vector<Candidate> excluded;
  // Index into ranked of the pair within noise of the first that needs the least memory, when that is
  // less than the first needs.
  std::optional<size_t> smaller_within_noise;
  nlohmann::json to_json(double budget_bytes) const;
};

// `rows` as read_runs returns them.
Recommendation recommend(const std::vector<nlohmann::json>& rows, const RecommendOptions& options);

}  // namespace bioquant::report
