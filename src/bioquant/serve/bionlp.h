// The biomedical task endpoints: a request becomes an evaluation example of a task description
// (eval/task.h), the prompt is the evaluation's own zero-shot prompt (eval/prompts.h), and the model's
// free text is read by the evaluation's parsers (eval/parsers.h) — so an endpoint answers exactly as
// `bioquant eval` would score the same input.
//
//   POST /v1/bionlp/ner       {"text", "task": NER task}            -> entities with character offsets
//   POST /v1/bionlp/relation  {"text" (arguments marked as in the dataset, e.g. @CHEMICAL$ / @GENE$),
//                              "task": relation task}                -> label
//   POST /v1/bionlp/classify  {"text", "task": multi-label task} or {"text", "labels": [...]} -> labels
//   POST /v1/bionlp/qa        {"question", "options": {"A": ...}} (MedQA's prompt) or
//                             {"question", "context"} (PubMedQA's)   -> answer
//
// NER offsets: the text is split into tokens the way the NER datasets are (CoNLL files of
// BC5CDR / NCBI-disease): every run of letters, digits and marks is a token and every other
// non-space character is a token of its own ("5-FU)." -> "5" "-" "FU" ")" "."). The model sees those
// tokens joined by single spaces, exactly like an evaluation example; the parser projects its
// answer onto the tokens, and each entity (a run of tokens) maps back to the span of the request
// text from its first token's first character to its last token's last character. Offsets are
// given twice: `start`/`end` count Unicode code points (Python's text[start:end]), `byte_start`/
// `byte_end` count UTF-8 bytes; both are end-exclusive.
#pragma once
#include <cstddef>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "bioquant/eval/prompts.h"
#include "bioquant/eval/task.h"
#include "bioquant/serve/api.h"

namespace bioquant::serve {

enum class TaskEndpoint { ner, relation, classify, qa };
const char* endpoint_path(TaskEndpoint e);  // "/v1/bionlp/ner", ...

// A token of request text, dataset-style, with where it lies in the text.
struct TextToken {
  std::string text;
  size_t byte_begin = 0, byte_end = 0;  // UTF-8 bytes, end-exclusive
  size_t char_begin = 0, char_end = 0;  // code points, end-exclusive
};
// Splits valid UTF-8 text as the NER datasets are tokenised (see above).
std::vector<TextToken> split_dataset_tokens(std::string_view text);

// One task request made into an evaluation example.
struct TaskQuery {
  TaskEndpoint endpoint = TaskEndpoint::ner;
  eval::TaskSpec task;              // a copy: a classify request with its own labels makes its own task
  eval::Example example;            // the request as an example of the task (no gold)
  std::string text;                 // ner: the request text
  std::vector<TextToken> tokens;    // ner: its tokens
  std::string prompt;               // the evaluation's zero-shot prompt (the user message with a chat template)
  int max_tokens = 0;               // the task's answer budget
};

// Validates a task request and builds its prompt. `chat`: the prompt will be wrapped in the chat
// template (eval's prompt without the trailing cue). `count_tokens` sizes the answer budget of a
// custom label set. Throws ApiError (400 for a bad request, 404 for an unknown task).
TaskQuery parse_task_request(TaskEndpoint endpoint, const nlohmann::json& body, bool chat,
                             const std::function<int64_t(const std::string&)>& count_tokens);

// The structured answer from the model's raw output:
//   ner       {"task", "entity_class", "entities": [{"text", "start", "end", "byte_start", "byte_end"}]}
//   relation  {"task", "label"}              (null when unparsed)
//   classify  {"task", "labels": [...]}      ("task" is "custom" for a request's own label set)
//   qa        {"task", "answer", "answer_text"}   (option text; null for yes/no/maybe or unparsed)
// plus "parsed" (false: the output could not be read; the answer is then empty / null) and
// "output" (the model's raw text).
nlohmann::json task_answer(const TaskQuery& query, const std::string& output);

}  // namespace bioquant::serve
