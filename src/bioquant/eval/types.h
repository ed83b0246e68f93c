// What every part of the evaluation harness shares: a task's family, an example's gold answer and a
// parsed model output. Readers produce Gold, parsers produce Prediction, metrics compare the two.
#pragma once
#include <compare>
#include <cstdint>
#include <string>
#include <vector>

namespace bioquant::eval {

enum class TaskFamily { ner, relation, multilabel, qa };

// Tokens [begin, end) of an example's gold tokenisation (NER entities).
struct Span {
  int32_t begin = 0;
  int32_t end = 0;
  auto operator<=>(const Span&) const = default;
};

// The reference answer of one example.
//   ner:        spans = the gold entities (maximal B I* runs), labels empty
//   relation:   labels = {the one gold label}
//   multilabel: labels = the gold label set (canonical names from the task's label list)
//   qa:         labels = {the gold answer: an option letter "A".."E", or "yes"/"no"/"maybe"}
struct Gold {
  std::vector<std::string> labels;
  std::vector<Span> spans;
};

// One model output after parsing. parsed == false means nothing valid could be read from it: the
// example counts as "unparsed" and is scored as wrong (never dropped). labels/spans then empty.
//   ner:        spans = predicted entities projected onto the gold tokens (sorted, unique)
//   relation:   labels = {one label of the task's label set}
//   multilabel: labels = the predicted labels (canonical names, label-set order; may be empty)
//   qa:         labels = {one option letter or yes/no/maybe}
struct Prediction {
  bool parsed = false;
  std::vector<std::string> labels;
  std::vector<Span> spans;
};

}  // namespace bioquant::eval
