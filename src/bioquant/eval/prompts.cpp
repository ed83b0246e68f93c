#include "bioquant/eval/prompts.h"

#include <algorithm>
#include <random>

#include "bioquant/core/error.h"
#include "bioquant/eval/parsers.h"

namespace bioquant::eval {

const char* const kChainOfThoughtInstruction =
    "Think step by step: first explain your reasoning briefly, then give the final answer, in the output "
    "format above, on a last line that starts with \"Answer:\".";

PromptMethod parse_prompt_method(const std::string& name) {
  if (name == "zero-shot") return PromptMethod::zero_shot;
  if (name == "few-shot") return PromptMethod::few_shot;
  if (name == "few-shot-similar") return PromptMethod::few_shot_similar;
  if (name == "cot") return PromptMethod::cot;
  throw Error("unknown method \"" + name + "\" (expected zero-shot, few-shot, few-shot-similar or cot)");
}

const char* prompt_method_name(PromptMethod method) {
  switch (method) {
    case PromptMethod::zero_shot: return "zero-shot";
    case PromptMethod::few_shot: return "few-shot";
    case PromptMethod::few_shot_similar: return "few-shot-similar";
    case PromptMethod::cot: return "cot";
  }
  return "?";
}

std::string render_gold_answer(const TaskSpec& task, const Example& ex) {
  switch (task.family) {
    case TaskFamily::ner: return render_ner_html(ex.tokens, ex.gold.spans, task.entity_class);
    case TaskFamily::multilabel: return render_multilabel_json(task.labels, ex.gold.labels);
    case TaskFamily::relation:
    case TaskFamily::qa:
      check(!ex.gold.labels.empty(), "example " + ex.id + " has no gold label");
      return ex.gold.labels.front();
  }
  return "";
}

namespace {

std::string options_block(const Example& ex) {
  std::string out;
  for (size_t i = 0; i < ex.option_letters.size(); ++i) {
    if (i) out += '\n';
    out.append(ex.option_letters[i]).append(". ").append(ex.option_texts[i]);
  }
  return out;
}

// {text} {context} {context_raw} {options}; unknown {names} are left as written.
std::string fill(const std::string& tmpl, const Example& ex) {
  std::string out;
  size_t i = 0;
  while (i < tmpl.size()) {
    if (tmpl[i] == '{') {
      const size_t close = tmpl.find('}', i);
      if (close != std::string::npos) {
        const std::string key = tmpl.substr(i + 1, close - i - 1);
        const std::string* value = nullptr;
        std::string options;
        if (key == "text") value = &ex.text;
        else if (key == "context") value = &ex.context;
        else if (key == "context_raw") value = &ex.context_raw;
        else if (key == "options") {
          options = options_block(ex);
          value = &options;
        }
        if (value) {
          out.append(*value);
          i = close + 1;
          continue;
        }
      }
    }
    out += tmpl[i++];
  }
  return out;
}

std::string rstrip(std::string s) {
  while (!s.empty() && (s.back() == ' ' || s.back() == '\n' || s.back() == '\r' || s.back() == '\t')) s.pop_back();
  return s;
}

}  // namespace

std::string render_input(const TaskSpec& task, const Example& ex, bool chen2023) {
  const std::string& tmpl =
      chen2023 && !task.chen2023_input_template.empty() ? task.chen2023_input_template : task.input_template;
  return fill(tmpl, ex);
}

std::vector<Example> choose_fewshot(const std::vector<Example>& pool, int k, uint64_t seed,
                                    const std::set<std::string>& exclude) {
  check(k >= 0, "--shots must be >= 0");
  std::vector<const Example*> eligible;
  for (const auto& ex : pool)
    if (!exclude.count(ex.id)) eligible.push_back(&ex);
  check(static_cast<size_t>(k) <= eligible.size(), "only " + std::to_string(eligible.size()) +
                                                       " few-shot examples are available outside the evaluated set, " +
                                                       std::to_string(k) + " asked");
  std::mt19937_64 rng(seed);
  // Partial Fisher-Yates with our own index draw: the choice is the same on every standard library.
  for (size_t i = 0; i < static_cast<size_t>(k); ++i) {
    const size_t j = i + static_cast<size_t>(rng() % (eligible.size() - i));
    std::swap(eligible[i], eligible[j]);
  }
  std::vector<Example> out;
  for (int i = 0; i < k; ++i) out.push_back(*eligible[static_cast<size_t>(i)]);
  return out;
}

std::string build_prompt(const TaskSpec& task, const PromptOptions& options, const std::vector<Example>& shots,
                         const Example& ex) {
  std::string prompt;
  const bool chen = options.chen2023;
  if (chen) {
    // Chen et al.'s file already holds its instruction and one worked example; the input follows it.
    prompt = rstrip(options.chen2023_text);
    prompt += "\n\n";
  } else {
    prompt = task.instruction;
    prompt += "\n\n";
  }
  if (uses_shots(options.method)) {
    prompt += "Examples:\n\n";
    for (const auto& shot : shots) {
      prompt += render_input(task, shot, false);
      prompt += '\n';
      prompt += task.output_prefix;
      prompt += ' ';
      prompt += render_gold_answer(task, shot);
      prompt += "\n\n";
    }
    prompt += "Now the input to answer:\n\n";
  }
  if (options.method == PromptMethod::cot) {
    prompt += kChainOfThoughtInstruction;
    prompt += "\n\n";
  }
  prompt += render_input(task, ex, chen);
  // Without a chat template the prompt ends with the answer cue the model continues from; in a chat
  // the assistant turn is the cue. Chen's inputs carry their own cue.
  if (!options.chat && !(chen && !task.chen2023_input_template.empty())) {
    prompt += '\n';
    prompt += options.method == PromptMethod::cot ? std::string("Reasoning:") : task.output_prefix;
  }
  return prompt;
}

}  // namespace bioquant::eval
