// Prompt builders: zero-shot, few-shot (k examples drawn with a recorded seed) and chain-of-thought,
// in BioQuant's wording or with Chen et al.'s prompt_chen2023.txt read from the data directory; and
// the gold answer rendered in the study's output format (few-shot answers, score self-checks).
#pragma once
#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "bioquant/eval/task.h"

namespace bioquant::eval {

// few_shot_similar: few-shot with each test item's most similar examples (similar_shots.h) rather
// than one seeded draw for all.
enum class PromptMethod { zero_shot, few_shot, few_shot_similar, cot };
PromptMethod parse_prompt_method(const std::string& name);  // zero-shot | few-shot | few-shot-similar | cot
const char* prompt_method_name(PromptMethod method);
inline bool uses_shots(PromptMethod m) { return m == PromptMethod::few_shot || m == PromptMethod::few_shot_similar; }

struct PromptOptions {
  PromptMethod method = PromptMethod::zero_shot;
  bool chen2023 = false;        // instruction = prompt_chen2023.txt of the task's data directory
  std::string chen2023_text;    // its content (loaded by the caller)
  bool chat = false;            // the prompt becomes the user turn of a chat template (no trailing cue)
};

// The gold answer of `ex` as the study asks the model to write it: NER = the sentence as HTML with
// <span class="..."> around entities; relation = the label; multilabel = a JSON object of 1/0 per
// label; QA = the option letter or yes/no/maybe.
std::string render_gold_answer(const TaskSpec& task, const Example& ex);

// The task input of `ex` (input_template, or chen2023_input_template when chen2023 is set).
std::string render_input(const TaskSpec& task, const Example& ex, bool chen2023);

// `k` few-shot examples from `pool`, never one whose id is in `exclude` (the evaluated examples):
// a seeded shuffle (std::mt19937_64) of the eligible examples, first k taken. Error when fewer than
// k are eligible.
std::vector<Example> choose_fewshot(const std::vector<Example>& pool, int k, uint64_t seed,
                                    const std::set<std::string>& exclude);

// The complete prompt text for `ex`. Everything before the example's own input is identical for all
// examples of a run, so the runner can reuse its KV cache.
std::string build_prompt(const TaskSpec& task, const PromptOptions& options, const std::vector<Example>& shots,
                         const Example& ex);

// The final-answer instruction appended for chain-of-thought.
extern const char* const kChainOfThoughtInstruction;

}  // namespace bioquant::eval
