// `bioquant eval`: runs tasks against a backend, resumably. Per task it writes
// OUT/samples/<task>.jsonl (one line per example: id, prompt, raw output, parsed answer, gold,
// correct), merges the task's summary into OUT/results.json, and records a row in the SQLite
// results database.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "bioquant/eval/backend.h"
#include "bioquant/eval/prompts.h"
#include "bioquant/eval/scoring.h"
#include "bioquant/eval/similar_shots.h"
#include "bioquant/eval/task.h"

namespace bioquant::eval {

struct EvalOptions {
  std::vector<const TaskSpec*> tasks;
  std::optional<std::string> data_dir;   // else $BIOQUANT_DATA, else ../shared/bionlp
  std::string split;                     // "" = each task's default split
  PromptMethod method = PromptMethod::zero_shot;
  int shots = 5;                         // few-shot examples
  uint64_t seed = 1234;                  // few-shot draw (recorded, part of the config hash)
  ScoringMode scoring = ScoringMode::generate;
  bool chen2023 = false;                 // prompt_chen2023.txt from the data directory
  bool chat = false;                     // prompts go through a chat template (as the backend applies it)
  int64_t limit = 0;                     // first N examples of the split (0 = all); not in the config hash
  int max_new_tokens = 0;                // 0 = the task's budget (chain of thought: + 384)
  std::string out_dir = "bioquant-eval";
  std::string db_path = "bioquant.sqlite";  // "" = no database
  ScoreOptions score;
  bool progress = true;                  // progress lines on stderr
  // Examples answered together in generate scoring (Backend::generate_batch); recorded, not in the
  // config hash: answers are those of 1 on the CPU with 16/32-bit weights, and may differ at
  // near-ties with quantized weights or on a GPU (see LocalBackend::generate_batch).
  int batch = 1;
  // Recorded with the run (identity of what was evaluated).
  std::string version, model, model_hash, quant, backend, device;
  // Exact numerics (Decoder's): part of the config hash when on (its answers are the same on every
  // device, but may differ from the default kernels' at near-ties).
  bool exact = false;
  int threads = 0;
  int64_t weight_bytes = 0;
  std::string sweep_cell;                // bioquant sweep's cell key, recorded with each row ("" = none)
};

// Runs every task; returns the content written to OUT/results.json.
nlohmann::json run_eval(const EvalOptions& options, Backend& backend);

// A fast content fingerprint of a model directory or file (SHA-256 over config/tokenizer files
// whole, and each weight file's size, first and last MiB): changes when the model does, without
// reading gigabytes.
std::string model_fingerprint(const std::string& path);

// Ids of `pool` examples that may not be drawn as few-shot examples when the whole `evaluated` split
// is evaluated: its own ids when the pool is that same split; otherwise the pool examples whose input
// (example_key) is one of the evaluated split's, since ids of different files are not comparable
// (readers without an id column number the rows, so MedQA's dev row 3 and test row 3 share an id).
std::set<std::string> fewshot_exclusions(const std::vector<Example>& evaluated, const std::vector<Example>& pool,
                                         bool pool_is_evaluated_split);

// The few-shot examples of a run: one seeded draw shown with every example (few-shot), or each
// example's most similar pool examples (few-shot-similar: similar_shots.h, over render_input's text);
// none for the other methods. `exclude`: ids never shown (fewshot_exclusions).
class FewShots {
 public:
  FewShots() = default;
  FewShots(const TaskSpec& task, PromptMethod method, int k, uint64_t seed, const std::vector<Example>& pool,
           std::set<std::string> exclude);
  std::vector<Example> for_example(const Example& ex) const;
  const std::vector<Example>& drawn() const { return drawn_; }  // few-shot's draw (empty otherwise)
  bool per_example() const { return similar_ != nullptr; }

 private:
  const TaskSpec* task_ = nullptr;
  int k_ = 0;
  std::vector<Example> drawn_;
  std::shared_ptr<const SimilarShots> similar_;
  std::set<std::string> exclude_;
};

// The answer plan for constrained / loglik scoring (empty for NER: free text only).
std::vector<AnswerSegment> answer_plan(const TaskSpec& task, const Example& ex);

}  // namespace bioquant::eval
