// Output parsers of the evaluation harness: raw, messy LLM output text -> Prediction.
//
// Every parser is total: any input (empty, binary, huge, half an HTML document) gives a Prediction
// and never throws. What cannot be read gives parsed == false (scored as wrong, counted "unparsed").
//
//   ner         HTML markup of the sentence (Chen et al.'s <span> format; <mark>, <b>, <strong>,
//               **bold** too), projected back onto the gold tokens by a character alignment; or an
//               entity list (JSON array, lines, commas) matched to token runs at token boundaries.
//   relation    exactly one label of the task's label set, by whole-word, spacing/punctuation-
//               tolerant matching ("cpr 4", "DDI_mechanism"), aliases, answer markers and negation.
//   multilabel  a lenient JSON object {label: 1/0} or array of label names; plain-text mentions as
//               the fallback.
//   qa          an option letter ("(B)", "Answer: B", "Option B", the option's text) or one of the
//               word answers (yes / no / maybe).
//
// The decisions behind the ambiguous cases are documented at each function below and in
// parsers.cpp; tests/eval_parsers_test.cpp pins them with real-looking outputs.
#pragma once
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "bioquant/eval/types.h"

namespace bioquant::eval {

// What a parser needs to know about the example and its task.
struct ParseContext {
  // ner: the example's gold tokens (CoNLL tokens, e.g. "(", "current", ",").
  std::vector<std::string> tokens;
  // relation / multilabel: the task's label set in canonical spelling ("CPR:3", "DDI-effect",
  // "sustaining proliferative signaling", "Case Report"); qa: the answer choices, {"A","B","C","D"}
  // (or with "E") or {"yes","no","maybe"}.
  std::vector<std::string> labels;
  // qa multiple choice: the text of each option, same order as labels (may be empty).
  std::vector<std::string> option_texts;
  // Extra phrase -> canonical label (e.g. {"no relation", "false"}), from the task description.
  // Matched like the labels themselves; a pair whose label is not in `labels` is ignored.
  std::vector<std::pair<std::string, std::string>> aliases;
  // The output is reasoning followed by a final answer line: parse final_answer_part(output) first,
  // and the whole output when that part gives nothing (parsed == false). Default off.
  bool chain_of_thought = false;
};

// Dispatches on the family (and chain_of_thought). Never throws.
Prediction parse_output(TaskFamily family, std::string_view output, const ParseContext& ctx);

// NER. Markup: tags are stripped (entities like &amp; decoded), the output's non-whitespace
// characters are aligned to the tokens' concatenated non-whitespace characters (case-insensitive
// fitting alignment: a preamble, a code fence, changed spacing and a few dropped or altered
// characters cost nothing or little), and each outermost marking element becomes one entity: the
// tokens MORE THAN HALF of whose characters it covers (a partially covered token belongs to the
// entity only when the element covers the majority of its characters). Adjacent elements stay
// separate entities. When the marked output does not reproduce the sentence (under half of it
// aligns, and the unmarked text around the marks does not align either: not a copy cut short),
// the marked texts are read as an entity list instead. List: every token run whose
// characters equal the item's (case- and space-insensitive) is an entity. "None", "[]", the sentence
// without markup: parsed, no entities. Empty output, or a list of which nothing matches: unparsed.
// Spans are sorted, unique and non-overlapping (longer matches win overlaps).
Prediction parse_ner(std::string_view output, const std::vector<std::string>& tokens);

// Relation: exactly one label of ctx.labels (or an alias of one). Matching is case-insensitive,
// ignores punctuation and spacing inside a label ("CPR-4", "cpr 4", "DDI_mechanism") and respects
// word boundaries ("CPR:3" never matches "CPR:30", "false" never "falsely"). Rules, in order:
//   1. answer markers win: after the last "answer:", "answer is", "relation is", "label:", ... that is
//      followed on its line by a label, that label;
//   2. a label right after a negation ("not CPR:3", "isn't", "rather than", "instead of") is skipped,
//      so "not CPR:3, it is CPR:4" gives CPR:4;
//   3. 3+ distinct (non-negated) labels without a marker = the option list echoed: unparsed;
//   4. otherwise the first-mentioned label.
// For label sets sharing a prefix (DDI-*), a short answer naming only the suffix ("mechanism") maps
// to its label when nothing else matches.
Prediction parse_relation(std::string_view output, const ParseContext& ctx);

// Multi-label: a JSON object {label: value} (fences, prose around it, single quotes, trailing
// commas, unquoted keys/values, keys in other case/spacing, values 1/0, true/false, "yes"/"no",
// probabilities >= 0.5; nested objects searched), or an array of label names; otherwise label
// names mentioned in the text ("Treatment: 1" lines, or bare mentions; negated mentions skipped;
// all labels mentioned bare = the list echoed = unparsed). All zeros / "none": parsed, empty.
// Labels come back canonical, in label-set order.
Prediction parse_multilabel(std::string_view output, const ParseContext& ctx);

// QA. Letter choices: answer markers ("Answer: B", "The answer is (B)") first; then the option's
// exact text; then a letter opening the output ("B", "(B)", "B.", "**B**", "B: Tell the
// attending..."; an article "A patient ..." is not option A); then explicit mentions ("Option B",
// "(B)", "B)" at a line start: 3+ distinct = echoed options = unparsed, else the first); then the
// option text found inside the output (only when a single option's text is). Word choices
// (yes/no/maybe): whole words, markers win, the first decisive mention otherwise (a word inside
// "yes or no" / "yes/no/maybe" alternatives is not decisive; 3 distinct = unparsed).
Prediction parse_qa(std::string_view output, const ParseContext& ctx);

// Chain of thought: the text after the last answer marker ("Answer: X", "Final answer: X",
// "Therefore, the answer is X", "**Answer:** X", "Output: X"; case-insensitive) up to the end of the
// output, trimmed; with no marker, the last non-empty line. A view into `output`.
std::string_view final_answer_part(std::string_view output);

// The sentence with each gold entity wrapped in <span class="ENTITY_CLASS">...</span>, tokens joined
// by single spaces (Chen et al.'s HTML format). Spans out of range or overlapping an earlier one
// are left out. Token text is written as is (not HTML-escaped), as the model sees the sentence.
std::string render_ner_html(const std::vector<std::string>& tokens, const std::vector<Span>& spans,
                            std::string_view entity_class);

// {"label": 1 or 0, ...} for every label in order, pretty-printed like the study's prompt (two-space
// indent, one key per line).
std::string render_multilabel_json(const std::vector<std::string>& label_set,
                                   const std::vector<std::string>& chosen);

}  // namespace bioquant::eval
