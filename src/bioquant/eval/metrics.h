// Scores of the eight BioNLP benchmarks, computed as Chen et al. do (shared/docs/benchmarks.md,
// "Metrics"): entity-level strict micro F1 (NER), macro F1 over a fixed label set (relation
// extraction), label-wise macro F1 (multi-label classification) and accuracy (QA).
//
// An unparsed prediction (Prediction::parsed == false) is never dropped: it is scored as wrong.
//   ner:        it predicts no entities (its gold entities become false negatives)
//   relation/qa: a false negative of the gold class and a false positive of no class
//   multilabel: an empty label set
// A parsed single-label prediction whose label is not in the label set is scored the same way and is
// counted as unparsed too ("output that maps to no valid label ... is reported as unparsed").
//
// Zero division: every precision, recall or F1 whose denominator is 0 is 0 (scikit-learn's default,
// zero_division="warn", which warns and returns 0). See compute_metric for what that means for
// classes absent from the gold data.
#pragma once
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "bioquant/eval/types.h"

namespace bioquant::eval {

enum class MetricKind { entity_f1, macro_f1, label_macro_f1, accuracy };

// "entity_f1", "macro_f1", "label_macro_f1", "accuracy"; anything else throws bioquant::Error naming
// the valid ones.
MetricKind parse_metric_kind(std::string_view name);
std::string_view metric_name(MetricKind kind);

// One class (relation label, answer, multi-label label, or NER's single entity class).
// support = number of gold instances (tp + fn).
struct ClassScore {
  std::string label;
  double precision = 0, recall = 0, f1 = 0;
  int64_t tp = 0, fp = 0, fn = 0, support = 0;
};

inline constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Fields that do not apply to a metric kind stay NaN. A field is filled whenever its quantity is
// defined for the kind, so some repeat the primary score (e.g. macro_f1 == score for macro_f1).
struct MetricResult {
  MetricKind kind = MetricKind::accuracy;
  double score = 0;            // the primary score
  double precision = kNaN;     // entity_f1: micro P; label_macro_f1: micro P over all (doc, label) pairs
  double recall = kNaN;        // likewise, micro R
  double micro_f1 = kNaN;      // entity_f1: == score; label_macro_f1: micro F1 (secondary)
  double accuracy = kNaN;      // macro_f1 / accuracy: fraction correct; label_macro_f1: exact-match ratio
  double macro_f1 = kNaN;      // macro_f1: == score; accuracy with a label set (PubMedQA): secondary
  int64_t n = 0;               // examples (sentences for NER, documents, pairs, questions)
  int64_t unparsed = 0;        // parsed == false, plus single-label predictions outside the label set
  int64_t tp = 0, n_pred = 0, n_gold = 0;  // entity_f1: summed over all sentences
  std::vector<ClassScore> per_class;       // label_set order; NER: one row for the entity class
};

// Computes `kind` over aligned gold/pred vectors (example i of one is example i of the other).
//
// entity_f1: sum TP (a predicted span equal to a gold span in begin and end), predicted and gold over
//   all sentences; P = TP/pred, R = TP/gold, F1 = 2PR/(P+R), each 0 when its denominator is 0 (so a
//   run with no predictions scores P = R = F1 = 0, and so does a data set without gold entities).
//   Spans are compared as sets (duplicates count once). label_set is optional: a single entry names
//   the per_class row, otherwise it is called "entity".
// macro_f1: per-class F1 over the FIXED label set, averaged with equal weight over all its labels,
//   including labels absent from the gold data. F1_c = 2tp/(2tp+fp+fn), 0 when tp+fp+fn == 0, i.e. a
//   class with no gold and no predictions scores 0 and pulls the mean down. This equals scikit-learn's
//   f1_score(y_true, y_pred, labels=label_set, average="macro") with the default zero_division. Note
//   that a call WITHOUT labels= (which Chen et al.'s unpublished scoring may have made) averages only
//   over labels present in y_true or y_pred, so it ignores never-seen classes and can add a class for
//   junk output; the benchmark doc fixes the label set, so we do too. The zero also matters for
//   bootstrap replicates that happen to contain no example of a rare class (e.g. DDI-int): they get
//   F1 0 for it, as they would under sklearn with labels=.
//   Every gold label must be in label_set (else Error); accuracy is filled alongside.
// label_macro_f1: for each label, binary F1 over documents (same zero rule), score = mean over the
//   label set; precision/recall/micro_f1 = micro over all (document, label) pairs; accuracy = exact
//   set match ratio. Gold labels must be in label_set; predicted labels outside it count for no label
//   (but do break an exact match).
// accuracy: fraction of examples whose single label equals the gold label. When label_set is
//   non-empty, macro_f1 and per_class are filled over it as for macro_f1 (PubMedQA reports both).
//
// Throws bioquant::Error on size mismatch, no examples, an empty or duplicated label set where one is
// needed, a gold label outside the set, or a single-label example whose gold (or parsed prediction)
// does not hold exactly one label.
MetricResult compute_metric(MetricKind kind, const std::vector<std::string>& label_set,
                            const std::vector<Gold>& gold, const std::vector<Prediction>& pred);

// Per-example correctness, for flips between two runs: ner = predicted span set equals the gold span
// set; relation/qa = the one label equal; multilabel = label sets equal. Unparsed = false (even where
// the gold is empty). Same shape checks as compute_metric, no label set needed.
std::vector<bool> per_example_correct(MetricKind kind, const std::vector<Gold>& gold,
                                      const std::vector<Prediction>& pred);

// The per-example contributions to a metric, reduced once to small integers so that a score over any
// multiset of examples (a bootstrap replicate) is O(n) additions with no string work.
// compute_metric(...) == MetricTable(...).result().
class MetricTable {
 public:
  MetricTable(MetricKind kind, const std::vector<std::string>& label_set, const std::vector<Gold>& gold,
              const std::vector<Prediction>& pred);

  size_t size() const { return n_; }
  MetricKind kind() const { return kind_; }

  // The full result over all examples, or over `indices` (repeats allowed, each counts again).
  MetricResult result() const;
  MetricResult result(std::span<const size_t> indices) const;
  // Just the primary score over `indices` (what the bootstrap needs).
  double score(std::span<const size_t> indices) const;
  // Per-example correctness (as per_example_correct).
  bool correct(size_t i) const { return correct_[i] != 0; }

 private:
  struct Totals;
  void accumulate(size_t i, Totals& t) const;
  Totals totals(std::span<const size_t> indices) const;
  Totals totals_all() const;
  MetricResult finish(const Totals& t) const;
  double finish_score(const Totals& t) const;

  MetricKind kind_;
  size_t n_ = 0;
  size_t k_ = 0;                       // classes (label set size; 1 for NER)
  std::vector<std::string> labels_;    // per_class names
  bool classes_ = false;               // single-label kinds: per-class counts available
  std::vector<uint8_t> correct_;       // per example
  std::vector<uint8_t> unparsed_;      // per example
  std::vector<int32_t> entity_;        // entity_f1: tp, pred, gold per example
  std::vector<int32_t> gold_class_;    // single-label: gold class index
  std::vector<int32_t> pred_class_;    // single-label: predicted class index, -1 = none
  // label_macro_f1: the labels of example i that count, ml_[ml_offsets_[i] .. ml_offsets_[i+1]), each
  // (class << 2) | bits with bit 0 = gold has the label, bit 1 = predicted (3 = tp, 2 = fp, 1 = fn).
  std::vector<uint32_t> ml_;
  std::vector<uint32_t> ml_offsets_;
};

}  // namespace bioquant::eval
