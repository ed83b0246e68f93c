// `bioquant report --db FILE --out DIR`: the study's tables and figures from the results database.
//
// Files (each written atomically):
//   index.html    self-contained (inline SVG and CSS, no script, nothing fetched): score vs. peak
//                 memory per task with the Pareto front; per-task scores by precision with 95% CI
//                 error bars; a heatmap of the score change versus 16-bit (precision x task) with
//                 significant changes marked; peak memory by precision; the tables below.
//   results.md    the same tables in Markdown.
//   scores.csv    model x precision x setting (rows) by task (columns), the paper's main table.
//   deltas.csv    every change versus 16-bit with its CI, p-value and test.
//   mean_deltas.csv  the change of each model x setting x precision's mean score over its tasks.
//   memory.csv    peak memory and weight bytes by model and precision.
//   results.csv   every result, one row each.
// Each table is one field list (Field) turned into Markdown, CSV and HTML by the same code.
//
// Significance of a change versus 16-bit: the paired bootstrap of compare_paired (eval/stats.h) on
// the two runs' sample files (same examples, 1000 replicates by default), significant when its
// 95% CI excludes 0; when a samples file is missing, the two runs' own 95% CIs are compared instead
// (significant when they do not overlap, a conservative test), and the table says which was used.
// Changes measured on fewer than 5 shared examples are shown but never called significant.
#pragma once
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "bioquant/eval/stats.h"
#include "bioquant/report/results.h"

namespace bioquant::report {

// ---- Tables: one field list, every format. ----
struct Column {
  std::string header;
  bool numeric = false;  // right-aligned
};
struct Table {
  std::string title;
  std::vector<Column> columns;
  std::vector<std::vector<std::string>> rows;
};
template <typename T>
struct Field {
  std::string header;
  bool numeric;
  std::function<std::string(const T&)> value;
};
template <typename T>
Table make_table(std::string title, const std::vector<Field<T>>& fields, const std::vector<T>& items) {
  Table t;
  t.title = std::move(title);
  for (const auto& f : fields) t.columns.push_back({f.header, f.numeric});
  for (const T& item : items) {
    std::vector<std::string> row;
    for (const auto& f : fields) row.push_back(f.value(item));
    t.rows.push_back(std::move(row));
  }
  return t;
}
std::string to_markdown(const Table& t);
std::string to_csv(const Table& t);  // RFC 4180 quoting
std::string to_html(const Table& t);

std::string html_escape(const std::string& s);

// ---- Comparisons with 16-bit. ----
struct Comparison {
  const RunResult* base = nullptr;  // the 16-bit run (bf16, else f16, else as stored, else f32)
  const RunResult* run = nullptr;
  double delta = 0;                 // run - base
  std::optional<double> ci_low, ci_high, p_value;  // paired bootstrap (absent for the CI test)
  bool significant = false;
  std::string test;                 // "paired bootstrap" or "CI overlap"
  int64_t shared_examples = 0;
  std::optional<eval::PairedTask> paired;  // the shared examples, when the paired bootstrap was used
};

// The change of the mean score over a (model, setting, precision)'s tasks versus 16-bit: its
// comparisons' deltas averaged; when every task was paired (on kMinPairedExamples+ examples), the
// stratified paired bootstrap of eval::compare_paired_mean (tasks in name order) gives its CI.
struct MeanComparison {
  const RunResult* run = nullptr;   // one of the group's runs (model, setting, precision)
  const RunResult* base = nullptr;  // one of the baseline's
  std::vector<std::string> tasks;   // in name order
  double base_mean = 0, mean = 0, delta = 0;
  std::optional<eval::MeanDifference> paired;  // absent: some task was not paired (test says which)
  bool significant = false;
  std::string test;
};
std::vector<MeanComparison> mean_changes_vs_16bit(const std::vector<Comparison>& comparisons, int bootstrap,
                                                  uint64_t seed);

struct ReportOptions {
  std::string out_dir = "bioquant-report";
  std::string db_path;              // shown in the report
  int bootstrap = 1000;             // paired bootstrap replicates
  uint64_t seed = 1234;
  std::string title = "BioQuant: quantization study report";
};

struct ReportSummary {
  size_t results = 0, comparisons = 0, paired = 0, ci_based = 0, significant = 0;
  std::vector<std::string> files;   // written, full paths
};

std::vector<Comparison> compare_with_16bit(const std::vector<RunResult>& results, int bootstrap, uint64_t seed);

// Writes every file into options.out_dir (created). `rows` as read_runs returns them.
ReportSummary write_report(const std::vector<nlohmann::json>& rows, const ReportOptions& options);

// The fixed colour of each precision in every chart ("#rrggbb").
std::string precision_color(const std::string& precision);

}  // namespace bioquant::report
