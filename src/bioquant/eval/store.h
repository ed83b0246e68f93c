// The results database: one SQLite row per (eval run, task) with the configuration and its hash,
// model hash, quantization, method, metric, CI, unparsed count, token counts, timings and peak
// memory, so runs made at different times and precisions can be compared and reported.
#pragma once
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace bioquant::eval {

// Column names of the `runs` table, in order (the keys record_run reads from a row object).
const std::vector<std::string>& run_columns();

// Inserts `rows` (objects keyed by run_columns(); missing keys are NULL) in one transaction,
// creating the database and table when absent. Error with a one-line message on failure.
void record_runs(const std::string& db_path, const std::vector<nlohmann::json>& rows);

// Every row, oldest first, as objects keyed by column name.
std::vector<nlohmann::json> read_runs(const std::string& db_path);

}  // namespace bioquant::eval
