// The results database read for reporting: one RunResult per configuration (the latest row of
// each model x precision x task x method x shots x scoring x split x prompt style), with the
// model named for people and the paths of its samples file.
#pragma once
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "bioquant/eval/types.h"

namespace bioquant::report {

struct RunResult {
  int64_t id = 0;  // row id (later runs have larger ids)
  std::string created_at;
  std::string model, model_hash, model_name;  // model_name: short, unique within the results
  std::string precision;                      // the runs table's quant ("none" = as stored)
  std::string task, method, scoring, split, prompt_style, metric, device, version;
  int64_t shots = 0;
  double score = 0, ci_low = 0, ci_high = 0;
  int64_t n = 0, unparsed = 0;
  double seconds = 0;
  std::optional<double> peak_rss_bytes, weight_bytes;
  std::optional<double> gpu_peak_bytes;       // runs on a GPU: the device's peak use
  std::string samples;                        // "" when unknown
  std::vector<std::string> labels;            // the metric's label set
};

// Latest row per configuration, in a stable order (model, precision rank, method, task order).
std::vector<RunResult> latest_results(const std::vector<nlohmann::json>& rows);

// 16-bit precisions in the order a baseline is chosen: bf16, f16, none (as stored), f32.
bool is_16bit_or_stored(const std::string& precision);
int precision_rank(const std::string& precision);  // display order: 16/32-bit first, then by bits
// For people: "as stored" for "none" (the weights as the checkpoint holds them), else the name.
std::string precision_label(const std::string& precision);

// A run's samples file (eval/runner.h: a line per example with id, parsed, gold), by id in file order.
struct SampleSet {
  std::map<std::string, nlohmann::json> by_id;
  std::vector<std::string> order;
};
// nullopt when the path is empty, missing, or not such a file (a report goes on without it).
std::optional<SampleSet> read_sample_set(const std::string& path);

// Samples files read once each: a report or a ranking compares one run with many others.
class SampleFiles {
 public:
  const std::optional<SampleSet>& get(const std::string& path);

 private:
  std::map<std::string, std::optional<SampleSet>> read_;
};

// The examples two runs share (by id, in a's order): the gold answers from a, each run's prediction.
// Throws when a shared line's gold or parsed answer is malformed.
struct PairedSamples {
  std::vector<eval::Gold> gold;
  std::vector<eval::Prediction> a, b;
};
PairedSamples pair_samples(const SampleSet& a, const SampleSet& b);

// Below this many shared examples a paired difference is shown but never called significant: a
// percentile interval from a handful of examples means nothing.
constexpr int64_t kMinPairedExamples = 5;

}  // namespace bioquant::report
