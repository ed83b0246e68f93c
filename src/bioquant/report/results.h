// The results database read for reporting: one RunResult per configuration (the latest row of
// each model x precision x task x method x shots x scoring x split x prompt style), with the
// model named for people and the paths of its samples file.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

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

}  // namespace bioquant::report
