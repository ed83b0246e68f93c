// From raw outputs to numbers, the same way for `eval`, `score` and `compare-runs`: the parse
// context of an example, predictions and gold as JSON (sample files), and a task's score summary
// (metric, per-class scores, unparsed count, bootstrap CI).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "bioquant/eval/metrics.h"
#include "bioquant/eval/parsers.h"
#include "bioquant/eval/task.h"

namespace bioquant::eval {

// The label set the metric runs over: relation / multilabel / yes-no-maybe labels, the option
// letters of multiple choice (union over examples), or {entity_class} for NER.
std::vector<std::string> metric_labels(const TaskSpec& task, const std::vector<Example>& examples);

ParseContext parse_context(const TaskSpec& task, const Example& ex, bool chain_of_thought);
Prediction parse_example_output(const TaskSpec& task, const Example& ex, const std::string& output,
                                bool chain_of_thought);

// {"labels": [...]} or {"spans": [[b, e], ...], "entities": ["text", ...]}; predictions add
// "parsed": bool. The inverse functions read what these write (compare-runs works from sample files).
nlohmann::json gold_to_json(const TaskSpec& task, const Example& ex);
nlohmann::json prediction_to_json(const TaskSpec& task, const Example& ex, const Prediction& pred);
Gold gold_from_json(const nlohmann::json& j);
Prediction prediction_from_json(const nlohmann::json& j);

struct ScoreOptions {
  int replicates = 1000;  // bootstrap replicates
  uint64_t seed = 1234;   // bootstrap seed (recorded)
};

// {"task", "split", "n", "metric", "score", "ci95": [lo, hi], "unparsed", "accuracy", "precision",
//  "recall", "micro_f1", "macro_f1" (those that apply), "per_class": [{label, precision, recall, f1,
//  tp, fp, fn, support}], "bootstrap": {replicates, seed}}.
nlohmann::json score_summary(const TaskSpec& task, const std::string& split, const std::vector<std::string>& labels,
                             const std::vector<Gold>& gold, const std::vector<Prediction>& pred,
                             const ScoreOptions& options);

}  // namespace bioquant::eval
