// Tasks as data: a task is a description (reader, splits, label set, metric, prompt texts) loaded
// from JSON — the eight built-in ones are the files in tasks/ compiled into the binary, and a user
// adds more with --task-file without recompiling. Readers turn a split file into Examples.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "bioquant/eval/types.h"

namespace bioquant::eval {

struct SplitSpec {
  std::string name;     // e.g. "sample200", "test_5options"
  std::string file;     // relative to the task's data directory
  std::string fewshot;  // split that few-shot examples come from when this split is evaluated
};

struct TaskSpec {
  std::string name;      // e.g. "chemprot"
  TaskFamily family = TaskFamily::relation;
  std::string dataset;   // human-readable dataset name
  std::string data_dir;  // sub-directory of the data directory
  std::string reader;    // "conll" | "tsv" | "mcq_jsonl"
  // tsv reader: our field -> file column header. Fields: id, text, label (one label), labels
  // (several, joined by label_separator), context (a Python-style list of passages).
  std::vector<std::pair<std::string, std::string>> columns;
  std::string label_separator = ";";
  std::vector<SplitSpec> splits;
  std::string default_split;
  std::string metric;                    // a MetricKind name (metrics.h)
  std::vector<std::string> labels;       // relation / multilabel label set; qa: yes/no/maybe (empty: option letters)
  std::vector<std::pair<std::string, std::string>> aliases;  // phrase -> label, for the parser
  std::string entity_class;              // ner: the span class name, e.g. "chemical"
  int max_new_tokens = 32;               // generation budget of a direct answer (CoT adds its own)
  std::string instruction;               // the zero-/few-shot instruction
  std::string input_template;            // {text} {context} {context_raw} {options}
  std::string output_prefix;             // the cue after the input, e.g. "Answer:"
  std::string chen2023_input_template;   // how an input follows prompt_chen2023.txt ("" = input_template)
  std::string source;                    // "builtin" or the description file's path

  const SplitSpec& split(const std::string& name) const;  // throws Error listing the splits
  std::string column(const std::string& field) const;     // "" when absent
};

// One benchmark item.
struct Example {
  std::string id;                    // the file's own id, else the 0-based position in the split file
  std::string text;                  // ner: the tokens joined by single spaces; else sentence / abstract / question
  std::vector<std::string> tokens;   // ner only
  std::string context;               // PubMedQA: the abstract's passages joined by single spaces
  std::string context_raw;           // the context column as written in the file
  std::vector<std::string> option_letters, option_texts;  // multiple choice
  Gold gold;
};

const char* family_name(TaskFamily family);
TaskFamily parse_family(const std::string& name);

// Parses and validates a description; errors are one line naming the problem (and `source`).
TaskSpec parse_task_spec(const nlohmann::json& description, const std::string& source);
TaskSpec load_task_file(const std::string& path);

// The built-in tasks (tasks/*.json) in the study's order, plus any added with register_task.
const std::vector<TaskSpec>& all_tasks();
void register_task(TaskSpec spec);  // replaces a task of the same name
// By name; unknown names throw an Error that lists the known ones (and a "did you mean").
const TaskSpec& find_task(const std::string& name);
// "all" or a comma-separated list of names.
std::vector<const TaskSpec*> select_tasks(const std::string& list);

// The data directory holding `task`'s files: `explicit_dir` if given, else $BIOQUANT_DATA, else
// ../shared/bionlp when present. Error naming all three places when none holds the task.
std::string resolve_data_dir(const std::optional<std::string>& explicit_dir, const TaskSpec& task);

// Reads one split. Errors (missing file, malformed row, unknown label) are one line with file:line.
std::vector<Example> read_split(const TaskSpec& task, const std::string& data_dir, const std::string& split);

// The splits BioQuant evaluates by default: the default split, sample200, and every "test*" split
// when the default is a test split (MedQA's test and test_5options). Training data for a model that will be evaluated here
// must come from none of them (and share no input text with them: see example_key).
std::vector<std::string> evaluated_splits(const TaskSpec& task);
// An example's input text, lower-cased with whitespace runs collapsed: equal keys = the same input.
std::string example_key(const Example& ex);

// Python-style list of string literals, as PubMedQA's CONTEXTS column ("['a', \"b\"]").
std::vector<std::string> parse_python_string_list(const std::string& text);

// NER gold entities: maximal B I* runs of a BIO tag sequence (an I without B starts an entity).
std::vector<Span> spans_from_bio(const std::vector<std::string>& tags);

}  // namespace bioquant::eval
