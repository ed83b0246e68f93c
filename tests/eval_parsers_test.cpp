// Output parsers: realistic messy LLM outputs per task family, each pinned to its exact parse.
// Sentences are BC5CDR-chemical / NCBI-disease sample200 sentences (CoNLL tokens joined by spaces);
// label names are the real ChemProt / DDI2013 / HoC / LitCovid / PubMedQA ones; the MedQA options
// are those of the first MedQA test question.
#include <gtest/gtest.h>

#include <random>
#include <sstream>

#include "bioquant/eval/parsers.h"

namespace bioquant::eval {
namespace {

std::vector<std::string> toks(const std::string& sentence) {
  std::vector<std::string> out;
  std::istringstream in(sentence);
  for (std::string t; in >> t;) out.push_back(t);
  return out;
}

using Spans = std::vector<Span>;
using Labels = std::vector<std::string>;

// BC5CDR-chemical sample200 sentences.
const std::string kVgb =
    "Two hundred four people with epilepsy were grouped on the basis of antiepileptic drug therapy ( current , "
    "previous , or no exposure to VGB ) .";  // VGB = [24,25)
const std::string kCocaine =
    "DESIGN : Male Sprague - Dawley rats received 100 mg / kg cocaine IP alone , 5 mg / kg diazepam alone , or a "
    "combination of diazepam and cocaine .";  // cocaine [12,13) [29,30); diazepam [20,21) [27,28)
const std::string kFu =
    "In this investigation the behavioural effects of chronic ( two week ) treatment with 5 - FU and ( three "
    "weeks ) with Fluoxetine either separately or in combination with 5 - FU were tested on adult Lister hooded "
    "rats .";  // 5 - FU [14,17) [30,33); Fluoxetine [23,24)
const std::string kPaclitaxel =
    "Paclitaxel , 5 - fluorouracil , and folinic acid in metastatic breast cancer : BRE - 26 , a phase II "
    "trial .";  // Paclitaxel [0,1); 5 - fluorouracil [2,5); folinic acid [7,9)
const std::string kIndinavir =
    "A higher cumulative incidence of persistent leukocyturia was found in children with an area under the "
    "curve > 19 mg / L x h or a peak serum level of indinavir > 12 mg / L .";  // indinavir [30,31)
const std::string kRifampicin =
    "Antirifampicin antibodies in acute rifampicin - associated renal failure .";  // rifampicin [4,5)
const std::string kSnp =
    "Coronary blood flow , cardiac work and metabolism were studied in dogs under sodium nitroprusside ( SNP ) "
    "and trimetaphan ( TMP ) deliberate hypotension ( 20 % and 40 % mean pressure decrease from baseline ) .";
// sodium nitroprusside [13,15); SNP [16,17); trimetaphan [19,20); TMP [21,22)
const std::string kGinsenoside =
    "Our data suggested that the ginsenoside Re , but not Rg1 or Rb1 , may contribute toward reversal of OIH .";
// ginsenoside Re [5,7); Rg1 [10,11); Rb1 [12,13)
// NCBI-disease sample200: no entity, but a token "none".
const std::string kNoneToken = "Interestingly , none of these mutations was observed in the PTPase core motif .";

Prediction ner(const std::string& out, const std::string& sentence) { return parse_ner(out, toks(sentence)); }

void expect_spans(const Prediction& p, const Spans& want) {
  EXPECT_TRUE(p.parsed);
  EXPECT_EQ(p.spans, want);
  EXPECT_TRUE(p.labels.empty());
}

// ---------------------------------------------------------------------------------------------
// NER

TEST(EvalParsersNer, ChenHtmlFormatAsRendered) {
  const std::string html = render_ner_html(toks(kVgb), {{24, 25}}, "chemical");
  EXPECT_EQ(html,
            "Two hundred four people with epilepsy were grouped on the basis of antiepileptic drug therapy ( "
            "current , previous , or no exposure to <span class=\"chemical\">VGB</span> ) .");
  expect_spans(ner(html, kVgb), {{24, 25}});
}

TEST(EvalParsersNer, SpacingChangedByTheModel) {
  expect_spans(ner("Two hundred four people with epilepsy were grouped on the basis of antiepileptic drug therapy "
                   "(current, previous, or no exposure to <span class=\"chemical\">VGB</span>).",
                   kVgb),
               {{24, 25}});
}

TEST(EvalParsersNer, PreambleFenceAndOtherAttributes) {
  const std::string out =
      "Here is the output:\n```html\n<p>Two hundred four people with epilepsy were grouped on the basis of "
      "antiepileptic drug therapy (current, previous, or no exposure to <span style='background-color: "
      "yellow' data-type=chemical>VGB</span>).</p>\n```\nLet me know if you need anything else!";
  expect_spans(ner(out, kVgb), {{24, 25}});
}

TEST(EvalParsersNer, MarkBoldStrongAndMultiTokenEntities) {
  const std::string out =
      "In this investigation the behavioural effects of chronic (two week) treatment with <mark>5-FU</mark> "
      "and (three weeks) with <b>Fluoxetine</b> either separately or in combination with <strong>5-FU</strong> "
      "were tested on adult Lister hooded rats.";
  expect_spans(ner(out, kFu), {{14, 17}, {23, 24}, {30, 33}});
}

TEST(EvalParsersNer, MarkdownBold) {
  const std::string out =
      "**Output:** In this investigation the behavioural effects of chronic ( two week ) treatment with **5 - "
      "FU** and ( three weeks ) with **Fluoxetine** either separately or in combination with **5 - FU** were "
      "tested on adult Lister hooded rats .";
  expect_spans(ner(out, kFu), {{14, 17}, {23, 24}, {30, 33}});
}

TEST(EvalParsersNer, AdjacentElementsAreSeparateEntities) {
  expect_spans(ner("<span>Paclitaxel</span>, <span>5-fluorouracil</span>, and <span>folinic</span> "
                   "<span>acid</span> in metastatic breast cancer: BRE-26, a phase II trial.",
                   kPaclitaxel),
               {{0, 1}, {2, 5}, {7, 8}, {8, 9}});
  expect_spans(ner("<span>Paclitaxel</span>, <span>5-fluorouracil</span>, and <span>folinic acid</span> in "
                   "metastatic breast cancer: BRE-26, a phase II trial.",
                   kPaclitaxel),
               {{0, 1}, {2, 5}, {7, 9}});
}

TEST(EvalParsersNer, NestedElementsCountAsTheOutermost) {
  expect_spans(ner("<span class=\"chemical\">Paclitaxel</span>, <span class=\"chemical\"><span "
                   "class=\"chemical\">5</span>-fluorouracil</span>, and <span class=\"chemical\"><b>folinic</b> "
                   "acid</span> in metastatic breast cancer: BRE-26, a phase II trial.",
                   kPaclitaxel),
               {{0, 1}, {2, 5}, {7, 9}});
}

TEST(EvalParsersNer, UnclosedElementEndsAtTheNextTagOrClausePunctuation) {
  // The span around 5-fluorouracil is never closed: it ends before ", and".
  expect_spans(ner("<span class=\"chemical\">Paclitaxel</span>, <span class=\"chemical\">5-fluorouracil, and "
                   "<span class=\"chemical\">folinic acid</span> in metastatic breast cancer: BRE-26, a phase II "
                   "trial.",
                   kPaclitaxel),
               {{0, 1}, {2, 5}, {7, 9}});
  // Output cut off inside the last entity (max tokens reached).
  expect_spans(ner("Paclitaxel, 5-fluorouracil, and <span class=\"chemical\">folinic aci", kPaclitaxel), {{7, 9}});
}

TEST(EvalParsersNer, HtmlEntitiesAreDecoded) {
  const std::string out =
      "A higher cumulative incidence of persistent leukocyturia was found in children with an area under the "
      "curve &gt; 19 mg/L x h or a peak serum level of <span class=&quot;chemical&quot;>indinavir</span> "
      "&gt;&nbsp;12 mg/L.";
  expect_spans(ner(out, kIndinavir), {{30, 31}});
}

// Entities of multi-byte characters decode to their UTF-8, then fold as the characters themselves do (an en
// dash, U+2013, three bytes: "5-FU").
TEST(EvalParsersNer, MultiByteEntitiesDecodeLikeTheCharacters) {
  const std::string tail = " were tested on adult Lister hooded rats.";
  const std::string head =
      "In this investigation the behavioural effects of chronic (two week) treatment with 5 - FU and (three weeks) "
      "with Fluoxetine either separately or in combination with <span>";
  for (const char* fu : {"5\u2013FU", "5&#x2013;FU", "5&#8211;FU", "5&ndash;FU"})
    expect_spans(ner(head + fu + "</span>" + tail, kFu), {{30, 33}});
  // Four bytes: the entity and the character give the same prediction.
  EXPECT_EQ(ner(head + "5&#x1F600;FU</span>" + tail, kFu).spans, ner(head + "5\U0001F600FU</span>" + tail, kFu).spans);
}

TEST(EvalParsersNer, AlteredCharactersStillProject) {
  // The model misspells the entity and drops the hyphen spacing.
  const std::string out =
      "In this investigation the behavioral effects of chronic (two week) treatment with <span>5-FU</span> and "
      "(three weeks) with <span>Flouxetine</span> either separately or in combination with <span>5FU</span> "
      "were tested on adult Lister hooded rats.";
  expect_spans(ner(out, kFu), {{14, 17}, {23, 24}, {30, 33}});
}

TEST(EvalParsersNer, PartiallyCoveredTokensNeedAMajority) {
  // "Anti" is 4 of the 14 characters of "Antirifampicin": not the token.
  expect_spans(ner("<span>Anti</span>rifampicin antibodies in acute <span>rifampicin</span>-associated renal "
                   "failure.",
                   kRifampicin),
               {{4, 5}});
  // 13 of 14 characters: the token.
  expect_spans(ner("<span>Antirifampici</span>n antibodies in acute rifampicin-associated renal failure.",
                   kRifampicin),
               {{0, 1}});
  // Marking spilling onto a neighbour: "-associated" is part of the element, so is the hyphen token.
  expect_spans(ner("Antirifampicin antibodies in acute <span>rifampicin-associated</span> renal failure.",
                   kRifampicin),
               {{4, 7}});
}

TEST(EvalParsersNer, MadeUpTagNames) {
  expect_spans(ner("Coronary blood flow, cardiac work and metabolism were studied in dogs under <chemical>sodium "
                   "nitroprusside</chemical> (<chemical>SNP</chemical>) and <chemical>trimetaphan</chemical> "
                   "(<chemical>TMP</chemical>) deliberate hypotension (20% and 40% mean pressure decrease from "
                   "baseline).",
                   kSnp),
               {{13, 15}, {16, 17}, {19, 20}, {21, 22}});
}

TEST(EvalParsersNer, EchoedInputThenMarkedOutput) {
  // Both copies of the sentence are in the output; the marks come from the marked one.
  const std::string out = "Input: " + kGinsenoside +
                          "\nOutput: Our data suggested that the <span class=\"chemical\">ginsenoside Re</span>, but "
                          "not <span class=\"chemical\">Rg1</span> or <span class=\"chemical\">Rb1</span>, may "
                          "contribute toward reversal of OIH.";
  expect_spans(ner(out, kGinsenoside), {{5, 7}, {10, 11}, {12, 13}});
}

TEST(EvalParsersNer, MarkedListInsteadOfTheSentence) {
  // Only the entities, each marked: read as a list, every occurrence counts.
  expect_spans(ner("<span class=\"chemical\">cocaine</span>, <span class=\"chemical\">diazepam</span>", kCocaine),
               {{12, 13}, {20, 21}, {27, 28}, {29, 30}});
}

TEST(EvalParsersNer, EntityListsEveryOccurrence) {
  const Spans all = {{12, 13}, {20, 21}, {27, 28}, {29, 30}};
  expect_spans(ner("Entities: cocaine, diazepam", kCocaine), all);
  expect_spans(ner("cocaine; diazepam", kCocaine), all);
  expect_spans(ner("**Chemicals:** cocaine, diazepam", kCocaine), all);
  expect_spans(ner("The chemical entities are cocaine and diazepam.", kCocaine), all);
  // an item that is no token run ("benzodiazepine") is ignored
  expect_spans(ner("Here are the chemicals:\n1. Cocaine\n2. Diazepam\n3. benzodiazepine", kCocaine), all);
}

TEST(EvalParsersNer, JsonAndBulletListsMatchAtTokenBoundaries) {
  const Spans fu = {{14, 17}, {23, 24}, {30, 33}};
  expect_spans(ner("```json\n[\"5-FU\", \"Fluoxetine\"]\n```", kFu), fu);
  expect_spans(ner("{\"entities\": [{\"text\": \"5-FU\", \"type\": \"Chemical\"}, {\"text\": \"fluoxetine\", "
                   "\"type\": \"Chemical\"}]}",
                   kFu),
               fu);
  expect_spans(ner("- **5-FU**\n- **Fluoxetine**", kFu), fu);
  // "FU" alone is a token run; "5-F" is not (it would cut a token).
  expect_spans(ner("- FU\n- 5-F", kFu), {{16, 17}, {32, 33}});
  // the list's overlapping items: the longer match wins
  expect_spans(ner("folinic acid, acid, Paclitaxel", kPaclitaxel), {{0, 1}, {7, 9}});
}

TEST(EvalParsersNer, NoEntitiesIsParsedEmpty) {
  expect_spans(ner("None", kVgb), {});
  expect_spans(ner("No chemical entities found.", kVgb), {});
  expect_spans(ner("[]", kVgb), {});
  expect_spans(ner("```json\n[]\n```", kVgb), {});
  // "None" is an answer even when the sentence has a token "none".
  expect_spans(ner("None", kNoneToken), {});
  expect_spans(ner("There are no disease entities in this sentence.", kNoneToken), {});
}

TEST(EvalParsersNer, SentenceCopiedWithoutMarkupHasNoEntities) {
  expect_spans(ner(kNoneToken, kNoneToken), {});
  expect_spans(ner("Interestingly, none of these mutations was observed in the PTPase core motif.", kNoneToken), {});
  // ... unless a list follows the copy
  expect_spans(ner("Two hundred four people with epilepsy were grouped on the basis of antiepileptic drug therapy "
                   "(current, previous, or no exposure to VGB).\nChemical entities: VGB",
                   kVgb),
               {{24, 25}});
}

TEST(EvalParsersNer, UnparsedOutputs) {
  EXPECT_FALSE(ner("", kVgb).parsed);
  EXPECT_FALSE(ner("   \n\t ", kVgb).parsed);
  EXPECT_FALSE(ner("I'm sorry, but I cannot help with that request.", kVgb).parsed);
  EXPECT_FALSE(ner("Entities: vigabatrin, carbamazepine", kVgb).parsed);  // nothing matches a token run
}

TEST(EvalParsersNer, ChainOfThoughtFinalAnswer) {
  ParseContext ctx;
  ctx.tokens = toks(kCocaine);
  ctx.chain_of_thought = true;
  const std::string out =
      "Let's think step by step. The sentence mentions two drugs given to rats: cocaine (100 mg/kg) and "
      "diazepam (5 mg/kg). IP is a route, not a chemical.\nFinal answer: cocaine, diazepam";
  expect_spans(parse_output(TaskFamily::ner, out, ctx), {{12, 13}, {20, 21}, {27, 28}, {29, 30}});
}

TEST(EvalParsersNer, RoundTripOfRenderedGold) {
  struct Case {
    std::string sentence;
    Spans gold;
  };
  const std::vector<Case> cases = {{kVgb, {{24, 25}}},
                                   {kCocaine, {{12, 13}, {20, 21}, {27, 28}, {29, 30}}},
                                   {kFu, {{14, 17}, {23, 24}, {30, 33}}},
                                   {kPaclitaxel, {{0, 1}, {2, 5}, {7, 9}}},
                                   {kIndinavir, {{30, 31}}},
                                   {kSnp, {{13, 15}, {16, 17}, {19, 20}, {21, 22}}},
                                   {kGinsenoside, {{5, 7}, {10, 11}, {12, 13}}},
                                   {kNoneToken, {}},
                                   {kPaclitaxel, {{7, 8}, {8, 9}}}};  // adjacent entities
  for (const Case& c : cases) {
    const std::string html = render_ner_html(toks(c.sentence), c.gold, "chemical");
    SCOPED_TRACE(html);
    expect_spans(parse_ner(html, toks(c.sentence)), c.gold);
  }
}

// ---------------------------------------------------------------------------------------------
// Relation

ParseContext chemprot() {
  ParseContext ctx;
  ctx.labels = {"CPR:3", "CPR:4", "CPR:5", "CPR:6", "CPR:9", "false"};
  return ctx;
}
ParseContext ddi() {
  ParseContext ctx;
  ctx.labels = {"DDI-effect", "DDI-mechanism", "DDI-advise", "DDI-int", "DDI-false"};
  return ctx;
}

void expect_label(const Prediction& p, const std::string& want) {
  EXPECT_TRUE(p.parsed);
  EXPECT_EQ(p.labels, Labels{want});
  EXPECT_TRUE(p.spans.empty());
}

TEST(EvalParsersRelation, SpellingVariants) {
  const ParseContext cp = chemprot();
  expect_label(parse_relation("CPR:4", cp), "CPR:4");
  expect_label(parse_relation("cpr 4", cp), "CPR:4");
  expect_label(parse_relation("CPR-4", cp), "CPR:4");
  expect_label(parse_relation("CPR\xEF\xBC\x9A" "4", cp), "CPR:4");  // fullwidth colon
  expect_label(parse_relation("`CPR:9`", cp), "CPR:9");
  expect_label(parse_relation("  'CPR:6'\n", cp), "CPR:6");
  expect_label(parse_relation("False.", cp), "false");
  const ParseContext d = ddi();
  expect_label(parse_relation("ddi effect", d), "DDI-effect");
  expect_label(parse_relation("DDI_mechanism", d), "DDI-mechanism");
  expect_label(parse_relation("**DDI-advise**", d), "DDI-advise");
  expect_label(parse_relation("DDI-int.", d), "DDI-int");
}

TEST(EvalParsersRelation, SurroundingWords) {
  const ParseContext cp = chemprot();
  expect_label(parse_relation("The relation is CPR:4 (inhibitor).", cp), "CPR:4");
  expect_label(parse_relation("Based on the sentence, @CHEMICAL$ acts as an antagonist of @GENE$, so the "
                              "relation type is CPR:6.",
                              cp),
               "CPR:6");
  expect_label(parse_relation("The answer is DDI-false.", ddi()), "DDI-false");
}

TEST(EvalParsersRelation, WordBoundaries) {
  const ParseContext cp = chemprot();
  EXPECT_FALSE(parse_relation("CPR:30", cp).parsed);
  EXPECT_FALSE(parse_relation("The claim was falsely attributed to the gene.", cp).parsed);
  expect_label(parse_relation("CPR:3.", cp), "CPR:3");
  expect_label(parse_relation("CPR:30 is not a label; CPR:3", cp), "CPR:3");
}

TEST(EvalParsersRelation, EchoedOptionListIsUnparsed) {
  const ParseContext cp = chemprot();
  EXPECT_FALSE(parse_relation("CPR:3, CPR:4, CPR:5, CPR:6, CPR:9, false", cp).parsed);
  EXPECT_FALSE(parse_relation("The options are 'DDI-effect', 'DDI-mechanism', 'DDI-advise', 'DDI-false', and "
                              "'DDI-int'.",
                              ddi())
                   .parsed);
}

TEST(EvalParsersRelation, AnswerMarkerPicksFromAnEchoedList) {
  expect_label(parse_relation("Options: CPR:3, CPR:4, CPR:5, CPR:6, CPR:9, false\nAnswer: CPR:6", chemprot()),
               "CPR:6");
  expect_label(parse_relation("DDI-effect, DDI-mechanism, DDI-advise, DDI-int, DDI-false\n\nFinal answer:\n"
                              "DDI-mechanism",
                              ddi()),
               "DDI-mechanism");
}

TEST(EvalParsersRelation, NegatedMentionsAreSkipped) {
  const ParseContext cp = chemprot();
  expect_label(parse_relation("not CPR:3, it is CPR:4", cp), "CPR:4");
  expect_label(parse_relation("It is CPR:4, not CPR:3.", cp), "CPR:4");
  expect_label(parse_relation("Answer: not CPR:3 but CPR:9", cp), "CPR:9");
  expect_label(parse_relation("This isn't CPR:5; I'd say CPR:6.", cp), "CPR:6");
}

TEST(EvalParsersRelation, TwoLabelsWithoutMarkerTakeTheFirst) {
  expect_label(parse_relation("CPR:3 or CPR:4", chemprot()), "CPR:3");
}

TEST(EvalParsersRelation, Aliases) {
  ParseContext cp = chemprot();
  cp.aliases = {{"no relation", "false"}, {"inhibitor", "CPR:4"}, {"antagonist", "CPR:6"}};
  expect_label(parse_relation("There is no relation between the chemical and the gene.", cp), "false");
  expect_label(parse_relation("INHIBITOR", cp), "CPR:4");
  expect_label(parse_relation("Antagonist (CPR:6)", cp), "CPR:6");
}

TEST(EvalParsersRelation, SharedPrefixSuffixOnly) {
  const ParseContext d = ddi();
  expect_label(parse_relation("mechanism", d), "DDI-mechanism");
  expect_label(parse_relation("Answer: false", d), "DDI-false");
  // not in a long sentence: "effect" there is just a word
  EXPECT_FALSE(parse_relation("The co-administration of these drugs has an effect on the patient that should "
                              "be monitored carefully.",
                              d)
                   .parsed);
}

TEST(EvalParsersRelation, UnparsedOutputs) {
  const ParseContext cp = chemprot();
  EXPECT_FALSE(parse_relation("", cp).parsed);
  EXPECT_FALSE(parse_relation("I don't know.", cp).parsed);
  EXPECT_FALSE(parse_relation("Not CPR:3.", cp).parsed);  // only a negated label
  EXPECT_FALSE(parse_relation("CPR:4", ParseContext{}).parsed);  // no label set
}

TEST(EvalParsersRelation, ChainOfThought) {
  ParseContext cp = chemprot();
  cp.chain_of_thought = true;
  expect_label(parse_output(TaskFamily::relation,
                            "The sentence says @CHEMICAL$ inhibits @GENE$. CPR:3 covers upregulators, which "
                            "does not fit; CPR:4 covers inhibitors.\nAnswer: CPR:4",
                            cp),
               "CPR:4");
  // the final line gives nothing: the whole output is parsed
  expect_label(parse_output(TaskFamily::relation, "The relation is CPR:9 (substrate).\nI hope this helps!", cp),
               "CPR:9");
}

// ---------------------------------------------------------------------------------------------
// Multi-label

const Labels kHoc = {"activating invasion and metastasis", "sustaining proliferative signaling",
                     "resisting cell death",               "cellular energetics",
                     "genomic instability and mutation",   "evading growth suppressors",
                     "inducing angiogenesis",              "enabling replicative immortality",
                     "avoiding immune destruction",        "tumor promoting inflammation"};
const Labels kLitCovid = {"Treatment",    "Diagnosis",            "Prevention", "Mechanism",
                          "Transmission", "Epidemic Forecasting", "Case Report"};

ParseContext hoc() {
  ParseContext ctx;
  ctx.labels = kHoc;
  return ctx;
}
ParseContext litcovid() {
  ParseContext ctx;
  ctx.labels = kLitCovid;
  return ctx;
}

void expect_labels(const Prediction& p, const Labels& want) {
  EXPECT_TRUE(p.parsed);
  EXPECT_EQ(p.labels, want);
}

TEST(EvalParsersMultilabel, StudyFormatAsRendered) {
  const std::string json = render_multilabel_json(kLitCovid, {"Treatment", "Case Report"});
  EXPECT_EQ(json,
            "{\n  \"Treatment\": 1,\n  \"Diagnosis\": 0,\n  \"Prevention\": 0,\n  \"Mechanism\": 0,\n  "
            "\"Transmission\": 0,\n  \"Epidemic Forecasting\": 0,\n  \"Case Report\": 1\n}");
  expect_labels(parse_multilabel(json, litcovid()), {"Treatment", "Case Report"});
}

TEST(EvalParsersMultilabel, FencedJsonWithTrailingProse) {
  expect_labels(parse_multilabel("```json\n{\n  \"Treatment\": 0,\n  \"Diagnosis\": 1,\n  \"Prevention\": 1,\n  "
                                 "\"Mechanism\": 0,\n  \"Transmission\": 0,\n  \"Epidemic Forecasting\": 0,\n  "
                                 "\"Case Report\": 0\n}\n```\nThe abstract describes CT findings and "
                                 "infection control measures, so Diagnosis and Prevention apply.",
                                 litcovid()),
                {"Diagnosis", "Prevention"});
}

TEST(EvalParsersMultilabel, SingleQuotesTrailingCommasUnquotedValues) {
  expect_labels(parse_multilabel("{'Treatment': 1, 'Diagnosis': 0, 'Prevention': 0, 'Mechanism': 1, "
                                 "'Transmission': 0, 'Epidemic Forecasting': 0, 'Case Report': 0,}",
                                 litcovid()),
                {"Treatment", "Mechanism"});
  expect_labels(parse_multilabel("{Treatment: true, Diagnosis: false, Prevention: \"yes\", Mechanism: \"no\", "
                                 "Transmission: \"1\", Epidemic Forecasting: 0, Case Report: null,\n}",
                                 litcovid()),
                {"Treatment", "Prevention", "Transmission"});
}

TEST(EvalParsersMultilabel, KeysInOtherCaseAndSpacing) {
  expect_labels(parse_multilabel("{\"treatment\": 0, \"DIAGNOSIS\": 0, \"prevention\": 0, \"mechanism\": 0, "
                                 "\"transmission\": 0, \"epidemic_forecasting\": 1, \"case-report\": 1}",
                                 litcovid()),
                {"Epidemic Forecasting", "Case Report"});
  expect_labels(parse_multilabel("{\"Activating Invasion & Metastasis\": 1, \"Sustaining Proliferative "
                                 "Signalling\": 1, \"Resisting_Cell_Death\": 1, \"cellular energetics\": 0}",
                                 hoc()),
                // "Signalling" (British) is not the label's spelling: that key is ignored.
                {"activating invasion and metastasis", "resisting cell death"});
}

TEST(EvalParsersMultilabel, KeysThatAreNotLabelsAreIgnored) {
  expect_labels(parse_multilabel("{\"Treatment\": 1, \"Vaccine\": 1, \"Diagnosis\": 0, \"reasoning\": \"The "
                                 "abstract evaluates remdesivir.\"}",
                                 litcovid()),
                {"Treatment"});
}

TEST(EvalParsersMultilabel, ArrayOfLabelNames) {
  expect_labels(parse_multilabel("[\"Mechanism\", \"Treatment\"]", litcovid()), {"Treatment", "Mechanism"});
  expect_labels(parse_multilabel("Relevant hallmarks: ['resisting cell death', 'genomic instability and "
                                 "mutation']",
                                 hoc()),
                {"resisting cell death", "genomic instability and mutation"});
  expect_labels(parse_multilabel("{\"topics\": [\"Transmission\", \"Prevention\"]}", litcovid()),
                {"Prevention", "Transmission"});
}

TEST(EvalParsersMultilabel, AllZerosAndNoneAreParsedEmpty) {
  expect_labels(parse_multilabel(render_multilabel_json(kHoc, {}), hoc()), {});
  expect_labels(parse_multilabel("None", hoc()), {});
  expect_labels(parse_multilabel("None of the hallmarks apply to this abstract.", hoc()), {});
  expect_labels(parse_multilabel("[]", litcovid()), {});
}

TEST(EvalParsersMultilabel, TruncatedJsonAndProbabilities) {
  expect_labels(parse_multilabel("{\n  \"Treatment\": 1,\n  \"Diagnosis\": 0,\n  \"Prevention\": 1", litcovid()),
                {"Treatment", "Prevention"});
  expect_labels(parse_multilabel("{\"Treatment\": 0.92, \"Diagnosis\": 0.10, \"Case Report\": 0.5}", litcovid()),
                {"Treatment", "Case Report"});
}

TEST(EvalParsersMultilabel, PlainTextMentions) {
  expect_labels(parse_multilabel("The article is related to Diagnosis and Treatment.", litcovid()),
                {"Treatment", "Diagnosis"});
  expect_labels(parse_multilabel("- Treatment: 1\n- Diagnosis: 0\n- Prevention: Yes\n- Case Report: no",
                                 litcovid()),
                {"Treatment", "Prevention"});
  expect_labels(parse_multilabel("The article is about Prevention, not Treatment.", litcovid()), {"Prevention"});
  expect_labels(parse_multilabel("This abstract relates to sustaining proliferative signaling; it also "
                                 "discusses inducing angiogenesis.",
                                 hoc()),
                {"sustaining proliferative signaling", "inducing angiogenesis"});
}

TEST(EvalParsersMultilabel, NestedAnswerAndChainOfThought) {
  ParseContext ctx = hoc();
  ctx.chain_of_thought = true;
  const std::string out =
      "The abstract reports that the extract induced apoptosis, which relates to resisting cell death, and "
      "inhibited proliferation (sustaining proliferative signaling). Angiogenesis is not discussed.\n"
      "Final answer: {\"result\": {\"resisting cell death\": 1, \"sustaining proliferative signaling\": 1, "
      "\"inducing angiogenesis\": 0}}";
  expect_labels(parse_output(TaskFamily::multilabel, out, ctx),
                {"sustaining proliferative signaling", "resisting cell death"});
}

TEST(EvalParsersMultilabel, UnparsedOutputs) {
  EXPECT_FALSE(parse_multilabel("", litcovid()).parsed);
  EXPECT_FALSE(parse_multilabel("This abstract discusses hospital workflows during the pandemic.", litcovid())
                   .parsed);
  // the prompt's template copied back, values left empty
  EXPECT_FALSE(parse_multilabel("{\n  \"Treatment\": ,\n  \"Diagnosis\": ,\n  \"Prevention\": ,\n  \"Mechanism\": "
                                ",\n  \"Transmission\": ,\n  \"Epidemic Forecasting\": ,\n  \"Case Report\": \n}",
                                litcovid())
                    .parsed);
  // every label named, none chosen: the label list echoed
  EXPECT_FALSE(parse_multilabel("Topics: Treatment, Diagnosis, Prevention, Mechanism, Transmission, Epidemic "
                                "Forecasting, Case Report.",
                                litcovid())
                   .parsed);
}

TEST(EvalParsersMultilabel, RoundTripOfRenderedGold) {
  const std::vector<Labels> hoc_golds = {{},
                                         {"sustaining proliferative signaling"},
                                         {"activating invasion and metastasis", "sustaining proliferative signaling"},
                                         {"evading growth suppressors", "sustaining proliferative signaling"},
                                         kHoc};
  for (const Labels& gold : hoc_golds) {
    Labels want;  // label-set order
    for (const std::string& l : kHoc)
      if (std::find(gold.begin(), gold.end(), l) != gold.end()) want.push_back(l);
    expect_labels(parse_multilabel(render_multilabel_json(kHoc, gold), hoc()), want);
  }
  expect_labels(parse_multilabel(render_multilabel_json(kLitCovid, {"Mechanism", "Treatment"}), litcovid()),
                {"Treatment", "Mechanism"});
  expect_labels(parse_multilabel(render_multilabel_json(kLitCovid, {"Prevention", "Transmission"}), litcovid()),
                {"Prevention", "Transmission"});
}

// ---------------------------------------------------------------------------------------------
// QA

ParseContext medqa() {
  ParseContext ctx;
  ctx.labels = {"A", "B", "C", "D"};
  ctx.option_texts = {"Disclose the error to the patient and put it in the operative report",
                      "Tell the attending that he cannot fail to disclose this mistake",
                      "Report the physician to the ethics committee", "Refuse to dictate the operative report"};
  return ctx;
}
ParseContext pubmedqa() {
  ParseContext ctx;
  ctx.labels = {"yes", "no", "maybe"};
  return ctx;
}

TEST(EvalParsersQa, LetterForms) {
  const ParseContext q = medqa();
  for (const char* out : {"B", "(B)", "B.", "B)", "Answer: B", "The answer is (B)", "**B**",
                          "B: Tell the attending that he cannot fail to disclose this mistake", "Option B", "b",
                          "[B]", "  B\n", "The correct answer is **B. Tell the attending that he cannot fail to "
                          "disclose this mistake**"}) {
    SCOPED_TRACE(out);
    expect_label(parse_qa(out, q), "B");
  }
}

TEST(EvalParsersQa, OptionTextWithoutLetter) {
  const ParseContext q = medqa();
  expect_label(parse_qa("Tell the attending that he cannot fail to disclose this mistake.", q), "B");
  expect_label(parse_qa("refuse to dictate the operative report", q), "D");
  expect_label(parse_qa("The resident should report the physician to the ethics committee, since the "
                        "attending asked to hide the complication.",
                        q),
               "C");
}

TEST(EvalParsersQa, ArticleAIsNotOptionA) {
  const ParseContext q = medqa();
  EXPECT_FALSE(parse_qa("A patient who is harmed by a complication deserves to know about it.", q).parsed);
  EXPECT_FALSE(parse_qa("A 45-year-old man would need more information.", q).parsed);
  expect_label(parse_qa("A", q), "A");
  expect_label(parse_qa("A. Disclose the error to the patient and put it in the operative report", q), "A");
  expect_label(parse_qa("A Disclose the error to the patient and put it in the operative report", q), "A");
  expect_label(parse_qa("A resident must be honest. The answer is C.", q), "C");
}

TEST(EvalParsersQa, EchoedOptionsAndMarkers) {
  const ParseContext q = medqa();
  const std::string echo =
      "A. Disclose the error to the patient and put it in the operative report\nB. Tell the attending that he "
      "cannot fail to disclose this mistake\nC. Report the physician to the ethics committee\nD. Refuse to "
      "dictate the operative report";
  EXPECT_FALSE(parse_qa(echo, q).parsed);
  expect_label(parse_qa(echo + "\n\nAnswer: D", q), "D");
  expect_label(parse_qa("the answer is b", q), "B");
  EXPECT_FALSE(parse_qa("E", q).parsed);  // not an option of this question
}

TEST(EvalParsersQa, ExplicitMentionsAndShortAnswers) {
  const ParseContext q = medqa();
  expect_label(parse_qa("I would go with option (C) here.", q), "C");
  expect_label(parse_qa("I would choose C.", q), "C");
  expect_label(parse_qa("Hmm, not (A). I think (D).", q), "D");
  EXPECT_FALSE(parse_qa("Options (A), (B) and (C) are all reasonable.", q).parsed);
}

TEST(EvalParsersQa, ChainOfThought) {
  ParseContext q = medqa();
  q.chain_of_thought = true;
  const std::string out =
      "Let's think step by step. A resident who made an error has an ethical duty to disclose it. Option A "
      "skips the attending; option C escalates too early.\nTherefore, the answer is B.";
  expect_label(parse_output(TaskFamily::qa, out, q), "B");
}

TEST(EvalParsersQa, YesNoMaybe) {
  const ParseContext y = pubmedqa();
  expect_label(parse_qa("Yes.", y), "yes");
  expect_label(parse_qa("yes", y), "yes");
  expect_label(parse_qa("No, because the hazard ratio was not significant.", y), "no");
  expect_label(parse_qa("NO", y), "no");
  expect_label(parse_qa("The answer is maybe.", y), "maybe");
  expect_label(parse_qa("OUTPUT: no", y), "no");
  expect_label(parse_qa("Maybe. The results are mixed, although yes for the subgroup.", y), "maybe");
  expect_label(parse_qa("There was no significant difference in cognitive decline. Answer: no", y), "no");
  expect_label(parse_qa("Yes or no is hard to say here; the answer is yes.", y), "yes");
}

TEST(EvalParsersQa, NotNoWords) {
  const ParseContext y = pubmedqa();
  for (const char* out : {"I cannot determine this from the abstract.", "It is not known.", "None",
                          "Nothing can be concluded.", "I don't know.", "Yesterday's data are incomplete.",
                          "yes, no, or maybe", "yes/no/maybe", ""}) {
    SCOPED_TRACE(out);
    EXPECT_FALSE(parse_qa(out, y).parsed);
  }
  expect_label(parse_qa("I cannot be certain, but probably yes.", y), "yes");
}

// ---------------------------------------------------------------------------------------------
// Chain of thought and robustness

TEST(EvalParsersCot, FinalAnswerPart) {
  EXPECT_EQ(final_answer_part("Reasoning here.\nFinal answer: CPR:4"), "CPR:4");
  EXPECT_EQ(final_answer_part("**Answer:** B"), "B");
  EXPECT_EQ(final_answer_part("Step 1 ... Step 2 ...\nTherefore, the answer is yes."), "yes.");
  EXPECT_EQ(final_answer_part("The answer is A? No.\nANSWER: C"), "C");
  EXPECT_EQ(final_answer_part("First line\nsecond line\n\n  last line  \n"), "last line");
  EXPECT_EQ(final_answer_part("To answer this we look at the evidence.\nIt points to maybe."), "It points to maybe.");
  EXPECT_EQ(final_answer_part(""), "");
}

TEST(EvalParsersRobust, NeverThrowsOnHostileInput) {
  const std::vector<std::string> nasty = {
      std::string(1, '\0'), "<", "<span", "</span>", "<span></span>", "**", "****", "&", "&#;", "&#x110000;",
      "&#99999999999;", "{", "[", "{\"a\":", "['", "{'Treatment': ", std::string(200, '{'), std::string(200, '['),
      std::string(500, '<') + "span>", "<span>" + std::string(100, '<') , "\xFF\xFE\xE2\x80", "Answer:",
      "answer is", "Answer: ", "(", "**A", "\xEF\xBC\x9A", "```", "```json\n", "Option", "option (",
  };
  std::string deep;
  for (int i = 0; i < 100; ++i) deep += "<span class=\"c\">";
  deep += "VGB";
  std::vector<std::string> inputs = nasty;
  inputs.push_back(deep);
  std::mt19937 rng(12345);
  const std::string alphabet = "<>/&;#{}[]()\"':,*-_ \n\tABCDspanyesno01VGB\xE2\x80\x93";
  for (int k = 0; k < 300; ++k) {
    std::string s;
    const int len = static_cast<int>(rng() % 120);
    for (int i = 0; i < len; ++i) s += alphabet[rng() % alphabet.size()];
    inputs.push_back(s);
  }
  inputs.push_back(std::string(20000, 'x') + "<span>VGB</span>");
  ParseContext ctxs[4] = {chemprot(), litcovid(), medqa(), pubmedqa()};
  ctxs[0].tokens = toks(kVgb);
  for (const std::string& in : inputs) {
    for (ParseContext& ctx : ctxs) {
      for (bool cot : {false, true}) {
        ctx.chain_of_thought = cot;
        for (TaskFamily f : {TaskFamily::ner, TaskFamily::relation, TaskFamily::multilabel, TaskFamily::qa}) {
          const Prediction p = parse_output(f, in, ctx);
          if (!p.parsed) {
            EXPECT_TRUE(p.labels.empty());
            EXPECT_TRUE(p.spans.empty());
          }
          for (size_t i = 0; i < p.spans.size(); ++i) {
            EXPECT_LT(p.spans[i].begin, p.spans[i].end);
            if (i > 0) {
              EXPECT_LE(p.spans[i - 1].end, p.spans[i].begin);
            }
          }
        }
      }
    }
  }
  // NER with no tokens at all
  EXPECT_FALSE(parse_ner("<span>x</span>", {}).parsed);
  EXPECT_TRUE(parse_ner("None", {}).parsed);
}

TEST(EvalParsersRender, DefensiveAboutBadSpans) {
  const std::vector<std::string> t = {"a", "b", "c"};
  EXPECT_EQ(render_ner_html(t, {{1, 3}, {0, 2}, {5, 9}}, "disease"), "<span class=\"disease\">a b</span> c");
  EXPECT_EQ(render_ner_html(t, {}, "disease"), "a b c");
  EXPECT_EQ(render_multilabel_json({}, {}), "{}");
}

}  // namespace
}  // namespace bioquant::eval
