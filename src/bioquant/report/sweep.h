// `bioquant sweep PLAN.json`: the study's grid (models x precisions x tasks x methods) run through
// the evaluation runner into one results database, resumably and shardable.
//
// A plan is one JSON object:
//   {"models": ["models/biomed-tiny", ...],          model directories or GGUF files (relative
//                                                     paths are taken from the plan file's directory)
//    "precisions": ["bf16", "int8", "nf4", "q4_k"],   quant names (or q4_k_m; "nf4+dq" = double quant)
//    "tasks": ["medqa", ...] or "all",
//    "methods": ["zero-shot", "few-shot"],
//    optional: "shots" (5), "limit" (0 = whole split), "split" (each task's default), "device" ("cpu";
//              "cuda" or "cuda:N": the GPU, checked by each worker before it loads a model),
//              "scoring" ("generate"), "max_new_tokens" (0 = the task's budget), "seed" (1234)}
// Any other key is an error. A cell is one (model, precision, task, method); its key (a hash of
// everything that defines it, the model's fingerprint included) is recorded in the runs table's
// sweep_cell column, and a cell whose key is already there is finished: a re-run skips it, and a
// cell cut short resumes example by example (the runner's samples file). Cells are ordered model,
// precision, method, task; `--shard i/n` takes every n-th cell from the i-th (1-based). Each model is
// loaded and quantized once per precision for all of its cells, in a worker process of its own, so
// the peak memory recorded with its rows is that (model, precision)'s alone.
#pragma once
#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace bioquant::report {

struct SweepPlan {
  std::vector<std::string> models, precisions, tasks, methods;
  int shots = 5;
  int64_t limit = 0;
  std::string split;                 // "" = each task's default
  std::string device = "cpu";
  bool exact = false;                // "numerics": "exact" (Decoder's exact numerics)
  std::string scoring = "generate";
  int max_new_tokens = 0;
  uint64_t seed = 1234;
};

// Validates everything (unknown keys, types, names of precisions/tasks/methods/scoring, device)
// and resolves relative model paths against `base_dir`. Errors are one line naming `where`.
SweepPlan parse_sweep_plan(const nlohmann::json& plan, const std::string& where, const std::string& base_dir = ".");
SweepPlan load_sweep_plan(const std::string& path);

struct Shard {
  int index = 1, count = 1;  // 1 <= index <= count
};
Shard parse_shard(const std::string& text);  // "i/n"

struct SweepCell {
  size_t index = 0;          // position in the whole grid
  std::string model, model_name, model_hash, precision, task, method;
  std::string key;           // recorded as sweep_cell
  std::string out_dir;       // the eval output directory of this cell
};

// Every cell of the grid, in order. `model_hashes` are the models' fingerprints (same order).
std::vector<SweepCell> enumerate_cells(const SweepPlan& plan, const std::vector<std::string>& model_hashes,
                                       const std::string& sweep_dir);
// The cells of one shard.
std::vector<SweepCell> shard_cells(const std::vector<SweepCell>& cells, const Shard& shard);
// The sweep_cell keys already recorded in the database (none when it does not exist yet).
std::vector<std::string> finished_cell_keys(const std::string& db_path);

struct SweepOptions {
  std::string db_path = "bioquant.sqlite";
  std::string out_dir;               // "" = beside the database: <db without extension>-sweep
  std::optional<std::string> data_dir;
  Shard shard;
  int threads = 0;
  int batch = 1;                     // eval's examples answered together (EvalOptions::batch)
  std::string version;               // recorded with every run
  bool progress = true;              // a line per cell on `log`
  bool example_progress = false;     // the runner's per-example lines too
  std::FILE* log = stderr;
};

struct SweepSummary {
  size_t cells = 0, in_shard = 0, finished_before = 0, ran = 0;
  double seconds = 0;
  std::string sweep_dir;
};

SweepSummary run_sweep(const SweepPlan& plan, const SweepOptions& options);

// The default sweep directory for a database path.
std::string default_sweep_dir(const std::string& db_path);

}  // namespace bioquant::report
