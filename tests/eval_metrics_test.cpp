// Evaluation metrics and their statistics: every expected value below is worked out by hand in the
// comments (shared/docs/benchmarks.md, "Metrics", gives the definitions).
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <string>
#include <vector>

#include "bioquant/core/error.h"
#include "bioquant/eval/metrics.h"
#include "bioquant/eval/stats.h"
#include "test_util.h"

namespace bioquant::eval {
namespace {

const std::vector<std::string> kChemProt = {"CPR:3", "CPR:4", "CPR:5", "CPR:6", "CPR:9", "false"};
const std::vector<std::string> kYesNoMaybe = {"yes", "no", "maybe"};

Gold ents(std::vector<Span> spans) { return Gold{{}, std::move(spans)}; }
Gold one(const std::string& label) { return Gold{{label}, {}}; }
Gold many(std::vector<std::string> labels) { return Gold{std::move(labels), {}}; }
Prediction pspans(std::vector<Span> spans) { return Prediction{true, {}, std::move(spans)}; }
Prediction plabel(const std::string& label) { return Prediction{true, {label}, {}}; }
Prediction plabels(std::vector<std::string> labels) { return Prediction{true, std::move(labels), {}}; }
Prediction unparsed() { return Prediction{}; }

using test::error_of;

// ---------------------------------------------------------------------------------------------------
// names

TEST(EvalMetrics, NamesRoundTripAndUnknownNameListsValidOnes) {
  for (MetricKind k : {MetricKind::entity_f1, MetricKind::macro_f1, MetricKind::label_macro_f1, MetricKind::accuracy})
    EXPECT_EQ(parse_metric_kind(metric_name(k)), k);
  EXPECT_EQ(metric_name(MetricKind::label_macro_f1), "label_macro_f1");
  const std::string msg = error_of([] { parse_metric_kind("f1"); });
  EXPECT_NE(msg.find("'f1'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("entity_f1, macro_f1, label_macro_f1, accuracy"), std::string::npos) << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos);
}

// ---------------------------------------------------------------------------------------------------
// entity_f1

TEST(EvalMetrics, NerExactMatchIsPerfect) {
  // 2 gold, the same 2 predicted: TP 2, pred 2, gold 2 -> P = R = F1 = 1.
  const auto r = compute_metric(MetricKind::entity_f1, {}, {ents({{0, 2}, {5, 6}})}, {pspans({{0, 2}, {5, 6}})});
  EXPECT_EQ(r.tp, 2);
  EXPECT_EQ(r.n_pred, 2);
  EXPECT_EQ(r.n_gold, 2);
  EXPECT_DOUBLE_EQ(r.precision, 1.0);
  EXPECT_DOUBLE_EQ(r.recall, 1.0);
  EXPECT_DOUBLE_EQ(r.score, 1.0);
  EXPECT_EQ(r.n, 1);
  EXPECT_EQ(r.unparsed, 0);
}

TEST(EvalMetrics, NerBoundaryOffByOneScoresNothing) {
  // gold [3,5), predicted [3,4): start matches, end does not -> TP 0, pred 1, gold 1 -> 0.
  const auto r = compute_metric(MetricKind::entity_f1, {}, {ents({{3, 5}})}, {pspans({{3, 4}})});
  EXPECT_EQ(r.tp, 0);
  EXPECT_EQ(r.n_pred, 1);
  EXPECT_EQ(r.n_gold, 1);
  EXPECT_DOUBLE_EQ(r.precision, 0.0);
  EXPECT_DOUBLE_EQ(r.recall, 0.0);
  EXPECT_DOUBLE_EQ(r.score, 0.0);
  // The other side too: [2,5) vs gold [3,5).
  EXPECT_DOUBLE_EQ(compute_metric(MetricKind::entity_f1, {}, {ents({{3, 5}})}, {pspans({{2, 5}})}).score, 0.0);
}

// Five sentences covering each case; micro sums over all of them.
//   s0 exact:     gold {[0,2),[5,6)}  pred {[0,2),[5,6)}  tp 2 pred 2 gold 2
//   s1 boundary:  gold {[3,5)}        pred {[3,4)}        tp 0 pred 1 gold 1
//   s2 extra:     gold {[1,2)}        pred {[1,2),[7,9)}  tp 1 pred 2 gold 1
//   s3 missing:   gold {[0,1),[4,6)}  pred {[4,6)}        tp 1 pred 1 gold 2
//   s4 unparsed:  gold {[2,3)}        (no entities)       tp 0 pred 0 gold 1
//   sums: TP 4, pred 6, gold 7 -> P = 4/6 = 2/3, R = 4/7, F1 = 2TP/(pred+gold) = 8/13.
std::vector<Gold> ner_gold() {
  return {ents({{0, 2}, {5, 6}}), ents({{3, 5}}), ents({{1, 2}}), ents({{0, 1}, {4, 6}}), ents({{2, 3}})};
}
std::vector<Prediction> ner_pred() {
  return {pspans({{0, 2}, {5, 6}}), pspans({{3, 4}}), pspans({{1, 2}, {7, 9}}), pspans({{4, 6}}), unparsed()};
}

TEST(EvalMetrics, NerMicroOverSentences) {
  const auto r = compute_metric(MetricKind::entity_f1, {"Chemical"}, ner_gold(), ner_pred());
  EXPECT_EQ(r.n, 5);
  EXPECT_EQ(r.unparsed, 1);
  EXPECT_EQ(r.tp, 4);
  EXPECT_EQ(r.n_pred, 6);
  EXPECT_EQ(r.n_gold, 7);
  EXPECT_DOUBLE_EQ(r.precision, 2.0 / 3.0);
  EXPECT_DOUBLE_EQ(r.recall, 4.0 / 7.0);
  EXPECT_DOUBLE_EQ(r.score, 8.0 / 13.0);
  EXPECT_DOUBLE_EQ(r.micro_f1, 8.0 / 13.0);
  EXPECT_TRUE(std::isnan(r.accuracy));
  EXPECT_TRUE(std::isnan(r.macro_f1));
  // One per-class row for the entity class: tp 4, fp = 6-4 = 2, fn = 7-4 = 3, support 7.
  ASSERT_EQ(r.per_class.size(), 1u);
  EXPECT_EQ(r.per_class[0].label, "Chemical");
  EXPECT_EQ(r.per_class[0].tp, 4);
  EXPECT_EQ(r.per_class[0].fp, 2);
  EXPECT_EQ(r.per_class[0].fn, 3);
  EXPECT_EQ(r.per_class[0].support, 7);
  EXPECT_DOUBLE_EQ(r.per_class[0].f1, 8.0 / 13.0);
  // Only s0 matches its gold set exactly; the unparsed s4 is wrong.
  EXPECT_EQ(per_example_correct(MetricKind::entity_f1, ner_gold(), ner_pred()),
            (std::vector<bool>{true, false, false, false, false}));
}

TEST(EvalMetrics, NerNoPredictionsAtAll) {
  // Every sentence parsed with no entities: TP 0, pred 0 (P = 0/0 -> 0), gold 3 (R = 0) -> F1 0.
  const std::vector<Gold> gold = {ents({{0, 1}}), ents({{2, 4}, {6, 7}}), ents({})};
  const std::vector<Prediction> pred = {pspans({}), pspans({}), pspans({})};
  const auto r = compute_metric(MetricKind::entity_f1, {}, gold, pred);
  EXPECT_EQ(r.tp, 0);
  EXPECT_EQ(r.n_pred, 0);
  EXPECT_EQ(r.n_gold, 3);
  EXPECT_DOUBLE_EQ(r.precision, 0.0);
  EXPECT_DOUBLE_EQ(r.recall, 0.0);
  EXPECT_DOUBLE_EQ(r.score, 0.0);
  EXPECT_EQ(r.unparsed, 0);
  EXPECT_EQ(r.per_class[0].label, "entity");
  // The third sentence (no gold, nothing predicted) is an exact match.
  EXPECT_EQ(per_example_correct(MetricKind::entity_f1, gold, pred), (std::vector<bool>{false, false, true}));
}

TEST(EvalMetrics, NerWithoutGoldEntitiesIsZeroNotNaN) {
  // gold 0, pred 0: every denominator is 0 -> P = R = F1 = 0 (documented), never NaN.
  const auto r = compute_metric(MetricKind::entity_f1, {}, {ents({}), ents({})}, {pspans({}), pspans({})});
  EXPECT_DOUBLE_EQ(r.score, 0.0);
  EXPECT_DOUBLE_EQ(r.precision, 0.0);
  EXPECT_DOUBLE_EQ(r.recall, 0.0);
}

TEST(EvalMetrics, NerDuplicateSpansCountOnce) {
  // pred {[0,2),[0,2)} against gold {[0,2)}: the set is {[0,2)} -> TP 1, pred 1, gold 1 -> 1.
  const auto r = compute_metric(MetricKind::entity_f1, {}, {ents({{0, 2}})}, {pspans({{0, 2}, {0, 2}})});
  EXPECT_EQ(r.n_pred, 1);
  EXPECT_DOUBLE_EQ(r.score, 1.0);
}

TEST(EvalMetrics, NerAllUnparsed) {
  // Nothing predicted anywhere: TP 0, pred 0, gold 1+2+1 = 4 -> 0; all 3 unparsed.
  const std::vector<Gold> gold = {ents({{0, 1}}), ents({{1, 2}, {3, 4}}), ents({{0, 3}})};
  const auto r = compute_metric(MetricKind::entity_f1, {}, gold, {unparsed(), unparsed(), unparsed()});
  EXPECT_EQ(r.unparsed, 3);
  EXPECT_EQ(r.n_gold, 4);
  EXPECT_EQ(r.n_pred, 0);
  EXPECT_DOUBLE_EQ(r.score, 0.0);
  // An unparsed prediction is wrong even where the gold has no entity.
  EXPECT_EQ(per_example_correct(MetricKind::entity_f1, {ents({})}, {unparsed()}), (std::vector<bool>{false}));
}

// ---------------------------------------------------------------------------------------------------
// macro_f1 (relation extraction)

// Ten ChemProt pairs (gold / predicted):
//   0 CPR:3 / CPR:3   ok       5 CPR:9 / CPR:4
//   1 CPR:3 / CPR:4            6 false / false   ok
//   2 CPR:4 / CPR:4   ok       7 false / CPR:6
//   3 CPR:4 / CPR:4   ok       8 CPR:3 / CPR:3   ok
//   4 CPR:4 / unparsed         9 false / false   ok
// Per class, F1 = 2tp / (2tp + fp + fn):
//   CPR:3  tp 2 (0,8)  fp 0        fn 1 (1)         -> 4/5
//   CPR:4  tp 2 (2,3)  fp 2 (1,5)  fn 1 (4)         -> 4/7
//   CPR:5  no gold, no predictions                  -> 0 (zero_division)
//   CPR:6  tp 0        fp 1 (7)    fn 0             -> 0 (predicted, never gold)
//   CPR:9  tp 0        fp 0        fn 1 (5)         -> 0 (gold, never predicted)
//   false  tp 2 (6,9)  fp 0        fn 1 (7)         -> 4/5
// macro = (4/5 + 4/7 + 0 + 0 + 0 + 4/5) / 6 = (56/35 + 20/35) / 6 = 76/210 = 38/105 = 0.3619...
// accuracy = 6/10 (0,2,3,6,8,9).
std::vector<Gold> chemprot_gold() {
  return {one("CPR:3"), one("CPR:3"), one("CPR:4"), one("CPR:4"), one("CPR:4"),
          one("CPR:9"), one("false"), one("false"), one("CPR:3"), one("false")};
}
std::vector<Prediction> chemprot_pred() {
  return {plabel("CPR:3"), plabel("CPR:4"), plabel("CPR:4"), plabel("CPR:4"), unparsed(),
          plabel("CPR:4"), plabel("false"), plabel("CPR:6"), plabel("CPR:3"), plabel("false")};
}

TEST(EvalMetrics, MacroF1OverFixedSixLabels) {
  const auto r = compute_metric(MetricKind::macro_f1, kChemProt, chemprot_gold(), chemprot_pred());
  EXPECT_NEAR(r.score, 38.0 / 105.0, 1e-15);
  EXPECT_NEAR(r.score, 0.3619047619, 1e-10);
  EXPECT_DOUBLE_EQ(r.macro_f1, r.score);
  EXPECT_DOUBLE_EQ(r.accuracy, 0.6);
  EXPECT_EQ(r.n, 10);
  EXPECT_EQ(r.unparsed, 1);
  EXPECT_TRUE(std::isnan(r.precision));
  ASSERT_EQ(r.per_class.size(), 6u);
  const double f1s[6] = {4.0 / 5, 4.0 / 7, 0, 0, 0, 4.0 / 5};
  const int64_t tps[6] = {2, 2, 0, 0, 0, 2}, fps[6] = {0, 2, 0, 1, 0, 0}, fns[6] = {1, 1, 0, 0, 1, 1};
  for (size_t c = 0; c < 6; ++c) {
    SCOPED_TRACE(kChemProt[c]);
    EXPECT_EQ(r.per_class[c].label, kChemProt[c]);
    EXPECT_NEAR(r.per_class[c].f1, f1s[c], 1e-15);
    EXPECT_EQ(r.per_class[c].tp, tps[c]);
    EXPECT_EQ(r.per_class[c].fp, fps[c]);
    EXPECT_EQ(r.per_class[c].fn, fns[c]);
    EXPECT_EQ(r.per_class[c].support, tps[c] + fns[c]);
  }
  // CPR:3: P = 2/2 = 1, R = 2/3; CPR:4: P = 2/4, R = 2/3.
  EXPECT_DOUBLE_EQ(r.per_class[0].precision, 1.0);
  EXPECT_DOUBLE_EQ(r.per_class[0].recall, 2.0 / 3.0);
  EXPECT_DOUBLE_EQ(r.per_class[1].precision, 0.5);
  EXPECT_DOUBLE_EQ(r.per_class[1].recall, 2.0 / 3.0);
  EXPECT_EQ(per_example_correct(MetricKind::macro_f1, chemprot_gold(), chemprot_pred()),
            (std::vector<bool>{true, false, true, true, false, false, true, false, true, true}));
}

TEST(EvalMetrics, MacroF1LabelOutsideSetIsWrongAndUnparsed) {
  // gold CPR:4, CPR:4; predicted CPR:4 and "CPR:2" (parsed, but no valid label).
  // CPR:4: tp 1, fp 0 (the junk label is a false positive of no class), fn 1 -> 2/3; the other five 0.
  // macro = (2/3) / 6 = 1/9; accuracy 1/2; the junk output is reported as unparsed.
  const auto r = compute_metric(MetricKind::macro_f1, kChemProt, {one("CPR:4"), one("CPR:4")},
                                {plabel("CPR:4"), plabel("CPR:2")});
  EXPECT_NEAR(r.score, 1.0 / 9.0, 1e-15);
  EXPECT_DOUBLE_EQ(r.accuracy, 0.5);
  EXPECT_EQ(r.unparsed, 1);
  EXPECT_EQ(r.per_class[1].fp, 0);
  EXPECT_EQ(r.per_class[1].fn, 1);
}

TEST(EvalMetrics, MacroF1AllUnparsed) {
  // 4 pairs, nothing parsed: every class tp 0, fp 0 -> F1 0; fn = its gold count.
  const std::vector<Gold> gold = {one("CPR:3"), one("CPR:4"), one("CPR:4"), one("false")};
  const auto r = compute_metric(MetricKind::macro_f1, kChemProt, gold, {unparsed(), unparsed(), unparsed(), unparsed()});
  EXPECT_DOUBLE_EQ(r.score, 0.0);
  EXPECT_DOUBLE_EQ(r.accuracy, 0.0);
  EXPECT_EQ(r.unparsed, 4);
  EXPECT_EQ(r.per_class[1].fn, 2);
  EXPECT_EQ(r.per_class[1].support, 2);
  EXPECT_EQ(r.per_class[5].fn, 1);
  for (const auto& c : r.per_class) EXPECT_EQ(c.fp, 0);
}

TEST(EvalMetrics, ShapeAndLabelErrors) {
  // Size mismatch.
  EXPECT_NE(error_of([] { compute_metric(MetricKind::macro_f1, kChemProt, {one("false")}, {}); }).find("1 gold"),
            std::string::npos);
  EXPECT_NE(error_of([] { per_example_correct(MetricKind::accuracy, {one("A")}, {plabel("A"), plabel("B")}); })
                .find("2 predictions"),
            std::string::npos);
  // No examples.
  EXPECT_NE(error_of([] { compute_metric(MetricKind::accuracy, {}, {}, {}); }).find("no examples"), std::string::npos);
  // Gold label outside the set, duplicated set, missing set.
  EXPECT_NE(error_of([] { compute_metric(MetricKind::macro_f1, kChemProt, {one("CPR:1")}, {plabel("false")}); })
                .find("'CPR:1'"),
            std::string::npos);
  EXPECT_NE(error_of([] { compute_metric(MetricKind::macro_f1, {"a", "a"}, {one("a")}, {plabel("a")}); })
                .find("twice"),
            std::string::npos);
  EXPECT_NE(error_of([] { compute_metric(MetricKind::label_macro_f1, {}, {many({})}, {plabels({})}); })
                .find("label set"),
            std::string::npos);
  // A single-label gold with two labels; a parsed single-label prediction with none.
  EXPECT_NE(error_of([] { compute_metric(MetricKind::accuracy, {}, {many({"A", "B"})}, {plabel("A")}); })
                .find("exactly one"),
            std::string::npos);
  EXPECT_NE(error_of([] { compute_metric(MetricKind::accuracy, {}, {one("A")}, {plabels({})}); }).find("exactly one"),
            std::string::npos);
}

// ---------------------------------------------------------------------------------------------------
// label_macro_f1 (multi-label)

// Labels {A, B, C, D}; C is never gold (only predicted once), D is never gold nor predicted.
//   d0 gold {A,B}  pred {A}
//   d1 gold {A}    pred {A,C}
//   d2 gold {B}    pred {B}        exact
//   d3 gold {A}    unparsed (= {})
//   A: tp 2 (d0,d1) fp 0 fn 1 (d3) -> 4/5
//   B: tp 1 (d2)    fp 0 fn 1 (d0) -> 2/3
//   C: tp 0         fp 1 (d1) fn 0 -> 0
//   D: nothing                     -> 0 (zero_division)
//   macro = (4/5 + 2/3) / 4 = (22/15) / 4 = 11/30
//   micro: tp 3, fp 1, fn 2 -> P = 3/4, R = 3/5, F1 = 6/(6+1+2) = 2/3; exact match 1/4.
TEST(EvalMetrics, LabelMacroF1WithLabelsAbsentFromGold) {
  const std::vector<std::string> labels = {"A", "B", "C", "D"};
  const std::vector<Gold> gold = {many({"A", "B"}), many({"A"}), many({"B"}), many({"A"})};
  const std::vector<Prediction> pred = {plabels({"A"}), plabels({"A", "C"}), plabels({"B"}), unparsed()};
  const auto r = compute_metric(MetricKind::label_macro_f1, labels, gold, pred);
  EXPECT_NEAR(r.score, 11.0 / 30.0, 1e-15);
  EXPECT_DOUBLE_EQ(r.precision, 0.75);
  EXPECT_DOUBLE_EQ(r.recall, 0.6);
  EXPECT_DOUBLE_EQ(r.micro_f1, 2.0 / 3.0);
  EXPECT_DOUBLE_EQ(r.accuracy, 0.25);
  EXPECT_EQ(r.unparsed, 1);
  EXPECT_EQ(r.n, 4);
  ASSERT_EQ(r.per_class.size(), 4u);
  EXPECT_DOUBLE_EQ(r.per_class[0].f1, 0.8);
  EXPECT_DOUBLE_EQ(r.per_class[1].f1, 2.0 / 3.0);
  EXPECT_DOUBLE_EQ(r.per_class[2].f1, 0.0);
  EXPECT_EQ(r.per_class[2].fp, 1);
  EXPECT_EQ(r.per_class[2].support, 0);
  EXPECT_DOUBLE_EQ(r.per_class[3].f1, 0.0);
  EXPECT_EQ(r.per_class[3].tp + r.per_class[3].fp + r.per_class[3].fn, 0);
  EXPECT_EQ(per_example_correct(MetricKind::label_macro_f1, gold, pred), (std::vector<bool>{false, false, true, false}));
}

TEST(EvalMetrics, LabelMacroF1SetSemantics) {
  // Order and duplicates do not matter: {B,A,A} == {A,B}. An unknown label counts for no label but
  // breaks the exact match: pred {A,Z} vs gold {A}: A tp 1 -> F1 1, B nothing -> 0; macro 1/2.
  const std::vector<std::string> labels = {"A", "B"};
  const auto r1 = compute_metric(MetricKind::label_macro_f1, labels, {many({"A", "B"})}, {plabels({"B", "A", "A"})});
  EXPECT_DOUBLE_EQ(r1.score, 1.0);
  EXPECT_DOUBLE_EQ(r1.accuracy, 1.0);
  const auto r2 = compute_metric(MetricKind::label_macro_f1, labels, {many({"A"})}, {plabels({"A", "Z"})});
  EXPECT_DOUBLE_EQ(r2.score, 0.5);
  EXPECT_DOUBLE_EQ(r2.precision, 1.0);
  EXPECT_DOUBLE_EQ(r2.accuracy, 0.0);
}

TEST(EvalMetrics, LabelMacroF1AllUnparsed) {
  // 2 docs, nothing parsed: tp 0, fp 0, fn 3 -> every F1 0; micro P = 0/0 -> 0, R = 0/3 = 0.
  const std::vector<std::string> labels = {"A", "B", "C"};
  const auto r = compute_metric(MetricKind::label_macro_f1, labels, {many({"A", "B"}), many({"C"})},
                                {unparsed(), unparsed()});
  EXPECT_DOUBLE_EQ(r.score, 0.0);
  EXPECT_DOUBLE_EQ(r.precision, 0.0);
  EXPECT_DOUBLE_EQ(r.recall, 0.0);
  EXPECT_DOUBLE_EQ(r.micro_f1, 0.0);
  EXPECT_DOUBLE_EQ(r.accuracy, 0.0);
  EXPECT_EQ(r.unparsed, 2);
}

// ---------------------------------------------------------------------------------------------------
// accuracy (QA)

// PubMedQA, 8 questions (gold / predicted):
//   0 yes/yes ok   1 yes/no   2 yes/yes ok   3 no/no ok   4 no/yes   5 maybe/maybe ok   6 maybe/no
//   7 yes/unparsed
// accuracy = 4/8 = 1/2
//   yes:   tp 2 (0,2)  fp 1 (4)    fn 2 (1,7) -> 4/7
//   no:    tp 1 (3)    fp 2 (1,6)  fn 1 (4)   -> 2/5
//   maybe: tp 1 (5)    fp 0        fn 1 (6)   -> 2/3
//   macro = (4/7 + 2/5 + 2/3) / 3 = (60 + 42 + 70) / 105 / 3 = 172/315 = 0.5460...
TEST(EvalMetrics, AccuracyAndMacroF1YesNoMaybe) {
  const std::vector<Gold> gold = {one("yes"), one("yes"), one("yes"), one("no"),
                                  one("no"),  one("maybe"), one("maybe"), one("yes")};
  const std::vector<Prediction> pred = {plabel("yes"), plabel("no"),    plabel("yes"), plabel("no"),
                                        plabel("yes"), plabel("maybe"), plabel("no"),  unparsed()};
  const auto r = compute_metric(MetricKind::accuracy, kYesNoMaybe, gold, pred);
  EXPECT_DOUBLE_EQ(r.score, 0.5);
  EXPECT_DOUBLE_EQ(r.accuracy, 0.5);
  EXPECT_NEAR(r.macro_f1, 172.0 / 315.0, 1e-15);
  EXPECT_NEAR(r.macro_f1, 0.5460317460, 1e-10);
  EXPECT_EQ(r.unparsed, 1);
  ASSERT_EQ(r.per_class.size(), 3u);
  EXPECT_EQ(r.per_class[0].label, "yes");
  EXPECT_NEAR(r.per_class[0].f1, 4.0 / 7.0, 1e-15);
  EXPECT_NEAR(r.per_class[1].f1, 0.4, 1e-15);
  EXPECT_NEAR(r.per_class[2].f1, 2.0 / 3.0, 1e-15);
  EXPECT_EQ(r.per_class[0].support, 4);
}

TEST(EvalMetrics, AccuracyWithoutLabelSet) {
  // MedQA letters, no label set: accuracy only. Correct: 0 and 2 -> 2/4; macro F1 stays NaN.
  const auto r = compute_metric(MetricKind::accuracy, {}, {one("A"), one("C"), one("D"), one("B")},
                                {plabel("A"), plabel("B"), plabel("D"), unparsed()});
  EXPECT_DOUBLE_EQ(r.score, 0.5);
  EXPECT_TRUE(std::isnan(r.macro_f1));
  EXPECT_TRUE(r.per_class.empty());
  EXPECT_EQ(r.unparsed, 1);
}

TEST(EvalMetrics, SingleExample) {
  // One PubMedQA question, answered right: accuracy 1. Macro F1 over {yes,no,maybe}: yes 1, no and
  // maybe have no gold and no predictions -> 0 each (zero_division) -> 1/3.
  const auto r = compute_metric(MetricKind::accuracy, kYesNoMaybe, {one("yes")}, {plabel("yes")});
  EXPECT_EQ(r.n, 1);
  EXPECT_DOUBLE_EQ(r.score, 1.0);
  EXPECT_NEAR(r.macro_f1, 1.0 / 3.0, 1e-15);
  // The same as a relation task: score = macro = 1/3.
  EXPECT_NEAR(compute_metric(MetricKind::macro_f1, kYesNoMaybe, {one("yes")}, {plabel("yes")}).score, 1.0 / 3.0, 1e-15);
}

TEST(EvalMetrics, TableOverIndicesCountsRepeats) {
  // MetricTable::result over a multiset equals compute_metric over the repeated examples:
  // ChemProt examples {0, 0, 5}: CPR:3 tp 2 -> F1 1; CPR:4 fp 1 -> 0; CPR:9 fn 1 -> 0.
  // macro = 1/6; accuracy 2/3.
  const MetricTable t(MetricKind::macro_f1, kChemProt, chemprot_gold(), chemprot_pred());
  const std::vector<size_t> idx = {0, 0, 5};
  const auto r = t.result(idx);
  EXPECT_NEAR(r.score, 1.0 / 6.0, 1e-15);
  EXPECT_DOUBLE_EQ(r.accuracy, 2.0 / 3.0);
  EXPECT_EQ(r.n, 3);
  EXPECT_DOUBLE_EQ(t.score(idx), r.score);
  EXPECT_DOUBLE_EQ(t.result().score, compute_metric(MetricKind::macro_f1, kChemProt, chemprot_gold(), chemprot_pred()).score);
  EXPECT_THROW(t.score(std::vector<size_t>{10}), Error);
}

// ---------------------------------------------------------------------------------------------------
// bootstrap

// n relation examples with a right/wrong pattern: example i is right when i % 10 < 7 (accuracy 0.7).
void pattern(size_t n, std::vector<Gold>& gold, std::vector<Prediction>& pred) {
  gold.clear();
  pred.clear();
  const std::vector<std::string> labels = {"yes", "no", "maybe"};
  for (size_t i = 0; i < n; ++i) {
    const std::string& g = labels[i % 3];
    gold.push_back(one(g));
    pred.push_back(i % 10 < 7 ? plabel(g) : (i % 10 == 9 ? unparsed() : plabel(labels[(i + 1) % 3])));
  }
}

TEST(EvalStats, PercentilesInterpolateLikeNumpy) {
  // A score that ignores the indices and returns 0, 1, ..., 999 in turn: sorted values 0..999, so
  // the 2.5% point is at h = 999 * 0.025 = 24.975 and the 97.5% point at 999 * 0.975 = 974.025.
  int calls = 0;
  const Interval ci = bootstrap_ci(5, [&](const std::vector<size_t>& idx) {
    EXPECT_EQ(idx.size(), 5u);
    for (size_t i : idx) EXPECT_LT(i, 5u);
    return static_cast<double>(calls++);
  });
  EXPECT_EQ(calls, 1000);
  EXPECT_NEAR(ci.low, 24.975, 1e-9);
  EXPECT_NEAR(ci.high, 974.025, 1e-9);
  // level 0.5 over 101 values 0..100: the 25% and 75% points are exactly 25 and 75.
  calls = 0;
  const Interval half = bootstrap_ci(3, [&](const std::vector<size_t>&) { return static_cast<double>(calls++); }, 101, 7, 0.5);
  EXPECT_DOUBLE_EQ(half.low, 25.0);
  EXPECT_DOUBLE_EQ(half.high, 75.0);
}

TEST(EvalStats, ResamplingIsUniformWithReplacement) {
  // 1000 replicates x 10 indices: every index appears; each of the 10 values is drawn ~1000 times
  // (binomial sd ~ 30, allow 6 sd) and the replicates do repeat indices.
  std::vector<int> count(10, 0);
  int with_repeats = 0;
  bootstrap_ci(10, [&](const std::vector<size_t>& idx) {
    std::vector<int> seen(10, 0);
    for (size_t i : idx) ++count[i], ++seen[i];
    for (int s : seen) if (s > 1) { ++with_repeats; break; }
    return 0.0;
  });
  for (int c : count) EXPECT_NEAR(c, 1000, 180);
  // P(no repeat in 10 draws of 10) = 10!/10^10 = 0.00036 -> nearly every replicate has one.
  EXPECT_GT(with_repeats, 990);
}

TEST(EvalStats, CiContainsPointEstimateAndIsDeterministic) {
  std::vector<Gold> gold;
  std::vector<Prediction> pred;
  pattern(200, gold, pred);
  const double acc = compute_metric(MetricKind::accuracy, kYesNoMaybe, gold, pred).score;
  EXPECT_DOUBLE_EQ(acc, 0.7);
  const Interval ci = metric_ci(MetricKind::accuracy, kYesNoMaybe, gold, pred);
  EXPECT_LT(ci.low, acc);
  EXPECT_GT(ci.high, acc);
  // Binomial sd = sqrt(0.7 * 0.3 / 200) = 0.0324; 95% half-width ~ 1.96 sd = 0.0635.
  EXPECT_NEAR(ci.high - ci.low, 2 * 0.0635, 0.02);
  const Interval again = metric_ci(MetricKind::accuracy, kYesNoMaybe, gold, pred);
  EXPECT_EQ(again.low, ci.low);
  EXPECT_EQ(again.high, ci.high);
  // Another seed draws other replicates. Accuracy over 200 moves in steps of 0.005, so its
  // percentiles can coincide across seeds; the macro F1 over the same draws takes many more values.
  const Interval other = metric_ci(MetricKind::accuracy, kYesNoMaybe, gold, pred, 1000, 99);
  EXPECT_NEAR(other.low, ci.low, 0.03);
  EXPECT_NEAR(other.high, ci.high, 0.03);
  const Interval m1 = metric_ci(MetricKind::macro_f1, kYesNoMaybe, gold, pred);
  const Interval m1_again = metric_ci(MetricKind::macro_f1, kYesNoMaybe, gold, pred);
  const Interval m2 = metric_ci(MetricKind::macro_f1, kYesNoMaybe, gold, pred, 1000, 99);
  EXPECT_EQ(m1.low, m1_again.low);
  EXPECT_EQ(m1.high, m1_again.high);
  EXPECT_TRUE(m2.low != m1.low || m2.high != m1.high);
  std::vector<std::vector<size_t>> draws;
  for (uint64_t seed : {1234u, 1234u, 99u})
    bootstrap_ci(200, [&](const std::vector<size_t>& idx) { draws.push_back(idx); return 0.0; }, 1, seed);
  EXPECT_EQ(draws[0], draws[1]);
  EXPECT_NE(draws[0], draws[2]);
}

TEST(EvalStats, CiNarrowsWithMoreData) {
  // The same 70% pattern on 50 and 800 examples: the width scales as 1/sqrt(n), a factor 4.
  std::vector<Gold> g1, g2;
  std::vector<Prediction> p1, p2;
  pattern(50, g1, p1);
  pattern(800, g2, p2);
  const Interval small = metric_ci(MetricKind::accuracy, {}, g1, p1);
  const Interval large = metric_ci(MetricKind::accuracy, {}, g2, p2);
  const double ws = small.high - small.low, wl = large.high - large.low;
  EXPECT_GT(wl, 0.0);
  EXPECT_LT(wl, ws / 2.5);
  EXPECT_GT(wl, ws / 6);
}

TEST(EvalStats, ConstantScoreGivesZeroWidth) {
  // Every answer right: every replicate scores 1 -> [1, 1]. All unparsed: [0, 0].
  std::vector<Gold> gold;
  std::vector<Prediction> pred, none;
  for (int i = 0; i < 30; ++i) {
    gold.push_back(one(i % 2 ? "yes" : "no"));
    pred.push_back(plabel(i % 2 ? "yes" : "no"));
    none.push_back(unparsed());
  }
  const Interval all = metric_ci(MetricKind::accuracy, kYesNoMaybe, gold, pred);
  EXPECT_EQ(all.low, 1.0);
  EXPECT_EQ(all.high, 1.0);
  const Interval zero = metric_ci(MetricKind::macro_f1, kYesNoMaybe, gold, none);
  EXPECT_EQ(zero.low, 0.0);
  EXPECT_EQ(zero.high, 0.0);
}

TEST(EvalStats, SingleExampleIsDegenerate) {
  // n = 1: every replicate is {0}: the interval is the example's own score.
  EXPECT_EQ(metric_ci(MetricKind::accuracy, {}, {one("A")}, {plabel("A")}).low, 1.0);
  const Interval ci = metric_ci(MetricKind::entity_f1, {}, {ents({{0, 1}, {2, 3}})}, {pspans({{0, 1}})});
  // TP 1, pred 1, gold 2 -> F1 = 2/3 in every replicate.
  EXPECT_DOUBLE_EQ(ci.low, 2.0 / 3.0);
  EXPECT_DOUBLE_EQ(ci.high, 2.0 / 3.0);
}

TEST(EvalStats, ErrorsForEmptyAndBadArguments) {
  const auto score = [](const std::vector<size_t>&) { return 0.0; };
  EXPECT_NE(error_of([&] { bootstrap_ci(0, score); }).find("n = 0"), std::string::npos);
  EXPECT_NE(error_of([&] { metric_ci(MetricKind::accuracy, {}, {}, {}); }).find("n = 0"), std::string::npos);
  EXPECT_NE(error_of([&] { compare_paired(MetricKind::accuracy, {}, {}, {}, {}); }).find("n = 0"), std::string::npos);
  EXPECT_THROW(bootstrap_ci(3, score, 0), Error);
  EXPECT_THROW(bootstrap_ci(3, score, 10, 1, 1.0), Error);
  EXPECT_THROW(bootstrap_ci(3, [](const std::vector<size_t>&) { return std::nan(""); }), Error);
  EXPECT_THROW(compare_paired(MetricKind::accuracy, {}, {one("A")}, {plabel("A")}, {}), Error);
}

// The fast path (precomputed counts) resamples and scores exactly like compute_metric on the
// resampled vectors.
TEST(EvalStats, MetricCiEqualsBootstrapOfComputeMetric) {
  struct Case {
    MetricKind kind;
    std::vector<std::string> labels;
    std::vector<Gold> gold;
    std::vector<Prediction> pred;
  };
  std::vector<Case> cases;
  cases.push_back({MetricKind::entity_f1, {}, ner_gold(), ner_pred()});
  cases.push_back({MetricKind::macro_f1, kChemProt, chemprot_gold(), chemprot_pred()});
  cases.push_back({MetricKind::label_macro_f1,
                   {"A", "B", "C", "D"},
                   {many({"A", "B"}), many({"A"}), many({"B"}), many({"A"}), many({"C", "D"})},
                   {plabels({"A"}), plabels({"A", "C"}), plabels({"B"}), unparsed(), plabels({"D"})}});
  for (const Case& c : cases) {
    SCOPED_TRACE(std::string(metric_name(c.kind)));
    const auto slow = [&](const std::vector<size_t>& idx) {
      std::vector<Gold> g;
      std::vector<Prediction> p;
      for (size_t i : idx) g.push_back(c.gold[i]), p.push_back(c.pred[i]);
      return compute_metric(c.kind, c.labels, g, p).score;
    };
    const Interval a = metric_ci(c.kind, c.labels, c.gold, c.pred, 300, 5);
    const Interval b = bootstrap_ci(c.gold.size(), slow, 300, 5);
    EXPECT_EQ(a.low, b.low);
    EXPECT_EQ(a.high, b.high);
    EXPECT_LT(a.low, a.high);
  }
}

TEST(EvalStats, FastForLargeRuns) {
  // 5000 DDI-sized examples, 5 classes, 1000 replicates: O(n) additions per replicate.
  const std::vector<std::string> labels = {"DDI-effect", "DDI-mechanism", "DDI-advise", "DDI-int", "DDI-false"};
  std::vector<Gold> gold;
  std::vector<Prediction> pred;
  for (size_t i = 0; i < 5000; ++i) {
    gold.push_back(one(labels[i % 5]));
    pred.push_back(i % 4 == 0 ? plabel(labels[(i + 2) % 5]) : plabel(labels[i % 5]));
  }
  const auto t0 = std::chrono::steady_clock::now();
  const auto cmp = compare_paired(MetricKind::macro_f1, labels, gold, pred, pred, 1000);
  const Interval ci = metric_ci(MetricKind::macro_f1, labels, gold, pred, 1000);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  // accuracy 3/4; every class has the same 3/4 recall and precision -> macro F1 0.75.
  EXPECT_NEAR(compute_metric(MetricKind::macro_f1, labels, gold, pred).score, 0.75, 1e-12);
  EXPECT_LT(ci.low, 0.75);
  EXPECT_GT(ci.high, 0.75);
  EXPECT_EQ(cmp.diff, 0.0);
  // 3000 scored replicates of 5000 examples; generous even for a sanitized debug build.
  EXPECT_LT(secs, 20.0);
}

// ---------------------------------------------------------------------------------------------------
// paired comparison

TEST(EvalStats, PairedIdenticalRuns) {
  std::vector<Gold> gold;
  std::vector<Prediction> pred;
  pattern(100, gold, pred);
  const auto c = compare_paired(MetricKind::macro_f1, kYesNoMaybe, gold, pred, pred);
  EXPECT_EQ(c.diff, 0.0);
  EXPECT_EQ(c.score_a, c.score_b);
  EXPECT_EQ(c.ci.low, 0.0);
  EXPECT_EQ(c.ci.high, 0.0);
  // Every d* == 0 counts in both tails: p = min(1, 2 * 1001/1001) = 1.
  EXPECT_EQ(c.p_value, 1.0);
  EXPECT_EQ(c.n, 100);
  EXPECT_EQ(c.right_to_wrong + c.wrong_to_right, 0);
  EXPECT_EQ(c.both_right, 70);
  EXPECT_EQ(c.both_wrong, 30);
  EXPECT_TRUE(c.right_to_wrong_indices.empty());
  EXPECT_TRUE(c.wrong_to_right_indices.empty());
}

// 10 questions. Run a is right on 0-5, run b on 2-8:
//   both right 2,3,4,5 (4); right->wrong 0,1 (2); wrong->right 6,7,8 (3); both wrong 9 (1).
//   accuracy a = 6/10, b = 7/10 -> diff = 0.1.
void known_flips(std::vector<Gold>& gold, std::vector<Prediction>& a, std::vector<Prediction>& b) {
  for (size_t i = 0; i < 10; ++i) {
    gold.push_back(one("yes"));
    a.push_back(i <= 5 ? plabel("yes") : plabel("no"));
    b.push_back(i >= 2 && i <= 8 ? plabel("yes") : (i == 9 ? unparsed() : plabel("maybe")));
  }
}

TEST(EvalStats, PairedKnownFlips) {
  std::vector<Gold> gold;
  std::vector<Prediction> a, b;
  known_flips(gold, a, b);
  const auto c = compare_paired(MetricKind::accuracy, kYesNoMaybe, gold, a, b);
  EXPECT_DOUBLE_EQ(c.score_a, 0.6);
  EXPECT_DOUBLE_EQ(c.score_b, 0.7);
  EXPECT_NEAR(c.diff, 0.1, 1e-15);
  EXPECT_EQ(c.n, 10);
  EXPECT_EQ(c.both_right, 4);
  EXPECT_EQ(c.both_wrong, 1);
  EXPECT_EQ(c.right_to_wrong, 2);
  EXPECT_EQ(c.wrong_to_right, 3);
  EXPECT_EQ(c.right_to_wrong_indices, (std::vector<size_t>{0, 1}));
  EXPECT_EQ(c.wrong_to_right_indices, (std::vector<size_t>{6, 7, 8}));
  // d* = (wrong->right - right->wrong draws) / 10 over the 5 discordant examples: the interval spans
  // 0 (only 5 discordant pairs) and a 1-example net gain is far from significant.
  EXPECT_LT(c.ci.low, 0.0);
  EXPECT_GT(c.ci.high, 0.1);
  EXPECT_GT(c.p_value, 0.3);
  EXPECT_LE(c.p_value, 1.0);
  // Reversing the runs negates everything.
  const auto r = compare_paired(MetricKind::accuracy, kYesNoMaybe, gold, b, a);
  EXPECT_NEAR(r.diff, -0.1, 1e-15);
  EXPECT_EQ(r.right_to_wrong, 3);
  EXPECT_EQ(r.wrong_to_right, 2);
  EXPECT_NEAR(r.ci.low, -c.ci.high, 1e-12);
  EXPECT_NEAR(r.ci.high, -c.ci.low, 1e-12);
  EXPECT_NEAR(r.p_value, c.p_value, 1e-12);
}

TEST(EvalStats, PairedAllFlipsGiveTheSmallestPValue) {
  // a wrong everywhere, b right everywhere: d* = 1 in every replicate -> CI [1, 1];
  // #{d* <= 0} = 0 -> p = 2 * (0 + 1) / (1000 + 1) = 2/1001.
  std::vector<Gold> gold;
  std::vector<Prediction> a, b;
  for (int i = 0; i < 20; ++i) {
    gold.push_back(one("B"));
    a.push_back(plabel("C"));
    b.push_back(plabel("B"));
  }
  const auto c = compare_paired(MetricKind::accuracy, {}, gold, a, b);
  EXPECT_EQ(c.diff, 1.0);
  EXPECT_EQ(c.ci.low, 1.0);
  EXPECT_EQ(c.ci.high, 1.0);
  EXPECT_DOUBLE_EQ(c.p_value, 2.0 / 1001.0);
  EXPECT_EQ(c.wrong_to_right, 20);
  EXPECT_EQ(c.wrong_to_right_indices.size(), 20u);
  EXPECT_EQ(c.wrong_to_right_indices.back(), 19u);
}

TEST(EvalStats, PairedNerDifference) {
  // Run a = ner_pred() (F1 8/13). Run b also gets s1 and s4 right, per sentence:
  //   s0 tp2 p2 g2; s1 pred {[3,5)} tp1 p1 g1; s2 tp1 p2 g1; s3 tp1 p1 g2; s4 pred {[2,3)} tp1 p1 g1
  //   -> TP 6, pred 7, gold 7 -> F1 = 12/14 = 6/7. diff = 6/7 - 8/13 = (78 - 56)/91 = 22/91.
  //   Flips by exact sentence match: s1 and s4 wrong -> right; s0 both right; s2, s3 both wrong.
  std::vector<Prediction> b = ner_pred();
  b[1] = pspans({{3, 5}});
  b[4] = pspans({{2, 3}});
  const auto c = compare_paired(MetricKind::entity_f1, {}, ner_gold(), ner_pred(), b);
  EXPECT_NEAR(c.score_a, 8.0 / 13.0, 1e-15);
  EXPECT_NEAR(c.score_b, 6.0 / 7.0, 1e-15);
  EXPECT_NEAR(c.diff, 22.0 / 91.0, 1e-15);
  EXPECT_EQ(c.wrong_to_right_indices, (std::vector<size_t>{1, 4}));
  EXPECT_EQ(c.right_to_wrong, 0);
  EXPECT_EQ(c.both_right, 1);
  EXPECT_EQ(c.both_wrong, 2);
  // b is never worse on any sentence, so d* >= 0 in every replicate: the CI starts at >= 0.
  EXPECT_GE(c.ci.low, 0.0);
  EXPECT_GT(c.ci.high, c.diff);
}

TEST(EvalStats, PairedMeanOfOneTaskIsComparePaired) {
  // One task draws as compare_paired does (seed + 0), and a mean over one task is that task's difference.
  std::vector<Gold> gold;
  std::vector<Prediction> a, b;
  for (size_t i = 0; i < 30; ++i) {
    gold.push_back(one("yes"));
    a.push_back(i % 3 == 0 ? plabel("no") : plabel("yes"));
    b.push_back(i % 5 == 0 ? plabel("no") : plabel("yes"));
  }
  const auto c = compare_paired(MetricKind::accuracy, kYesNoMaybe, gold, a, b, 500, 77);
  const auto m = compare_paired_mean({{MetricKind::accuracy, kYesNoMaybe, gold, a, b}}, 500, 77);
  EXPECT_EQ(m.diff, c.diff);
  EXPECT_EQ(m.ci.low, c.ci.low);
  EXPECT_EQ(m.ci.high, c.ci.high);
  EXPECT_EQ(m.p_value, c.p_value);
  EXPECT_EQ(m.n, 30);
}

TEST(EvalStats, PairedMeanAveragesTheTasksDifferences) {
  // Task 0: the ten questions of known_flips (diff 0.1). Task 1: NER where b equals a (diff 0 in
  // every replicate). The mean's replicates are task 0's halved, so its CI is task 0's halved; the
  // p-value counts the same signs.
  std::vector<Gold> gold;
  std::vector<Prediction> a, b;
  known_flips(gold, a, b);
  const auto c = compare_paired(MetricKind::accuracy, kYesNoMaybe, gold, a, b);
  const auto m = compare_paired_mean({{MetricKind::accuracy, kYesNoMaybe, gold, a, b},
                                      {MetricKind::entity_f1, {}, ner_gold(), ner_pred(), ner_pred()}});
  EXPECT_NEAR(m.diff, 0.05, 1e-15);
  EXPECT_NEAR(m.ci.low, c.ci.low / 2, 1e-15);
  EXPECT_NEAR(m.ci.high, c.ci.high / 2, 1e-15);
  EXPECT_EQ(m.p_value, c.p_value);
  EXPECT_EQ(m.n, 10 + static_cast<int64_t>(ner_gold().size()));

  // Two one-question tasks: every replicate redraws the same question, so d* is fixed. b gains a
  // question on the first (+1) and loses one on the second (-1): mean 0, CI [0, 0], p = 1; with the
  // second tied instead, mean 0.5, CI [0.5, 0.5], p = 2/1001.
  const std::vector<Gold> g1 = {one("A")};
  const auto tied = compare_paired_mean({{MetricKind::accuracy, {}, g1, {plabel("B")}, {plabel("A")}},
                                         {MetricKind::accuracy, {}, g1, {plabel("A")}, {plabel("B")}}});
  EXPECT_EQ(tied.diff, 0.0);
  EXPECT_EQ(tied.ci.low, 0.0);
  EXPECT_EQ(tied.ci.high, 0.0);
  EXPECT_EQ(tied.p_value, 1.0);
  const auto gain = compare_paired_mean({{MetricKind::accuracy, {}, g1, {plabel("B")}, {plabel("A")}},
                                         {MetricKind::accuracy, {}, g1, {plabel("A")}, {plabel("A")}}});
  EXPECT_EQ(gain.diff, 0.5);
  EXPECT_EQ(gain.ci.low, 0.5);
  EXPECT_EQ(gain.ci.high, 0.5);
  EXPECT_DOUBLE_EQ(gain.p_value, 2.0 / 1001.0);
}

TEST(EvalStats, PairedMeanRefusesNoTasksAndMismatchedRuns) {
  EXPECT_NE(error_of([] { compare_paired_mean({}); }).find("no tasks"), std::string::npos);
  EXPECT_NE(error_of([] { compare_paired_mean({{MetricKind::accuracy, {}, {one("A")}, {plabel("A")}, {}}}); })
                .find("run b 0"),
            std::string::npos);
  EXPECT_NE(error_of([] { compare_paired_mean({{MetricKind::accuracy, {}, {}, {}, {}}}); }).find("n = 0"),
            std::string::npos);
}

}  // namespace
}  // namespace bioquant::eval
