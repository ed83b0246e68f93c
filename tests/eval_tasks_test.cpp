// Task descriptions, readers and prompt builders against the real benchmark files in ../shared/bionlp.
#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <set>

#include <nlohmann/json.hpp>

#include "bioquant/core/closest_name.h"
#include "bioquant/core/error.h"
#include "bioquant/eval/prompts.h"
#include "bioquant/eval/runner.h"
#include "bioquant/eval/similar_shots.h"
#include "bioquant/eval/task.h"
#include "test_util.h"

namespace bioquant::eval {
namespace {

std::string data_dir() {
  const std::string shared = test::shared_dir();
  return shared.empty() ? "" : shared + "/bionlp";
}

#define REQUIRE_DATA()                                              \
  if (data_dir().empty()) GTEST_SKIP() << "../shared/bionlp not present"

TEST(EvalTasks, BuiltinsAreTheStudysEightInOrder) {
  std::vector<std::string> names;
  for (const auto& t : all_tasks())
    if (t.source == "builtin") names.push_back(t.name);
  EXPECT_EQ(names, (std::vector<std::string>{"bc5cdr-chem", "ncbi-disease", "chemprot", "ddi2013", "hoc", "litcovid",
                                             "medqa", "pubmedqa"}));
  EXPECT_EQ(find_task("chemprot").labels.size(), 6u);
  EXPECT_EQ(find_task("ddi2013").labels.size(), 5u);
  EXPECT_EQ(find_task("hoc").labels.size(), 10u);
  EXPECT_EQ(find_task("litcovid").labels.size(), 7u);
  EXPECT_EQ(find_task("medqa").default_split, "test");
  EXPECT_EQ(find_task("pubmedqa").default_split, "sample200");
  EXPECT_EQ(select_tasks("all").size(), all_tasks().size());
  EXPECT_EQ(select_tasks("hoc, medqa,hoc").size(), 2u);
}

TEST(EvalTasks, UnknownTaskSuggestsTheClosestName) {
  try {
    find_task("chemprott");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("did you mean chemprot?"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("pubmedqa"), std::string::npos);
  }
  EXPECT_THROW(select_tasks("hoc,,medqa"), Error);
  const auto message = [](const std::string& name) { return test::error_of([&] { find_task(name); }); };
  EXPECT_NE(message("ncbi").find("did you mean ncbi-disease?"), std::string::npos) << message("ncbi");
  EXPECT_NE(message("pubmed").find("did you mean pubmedqa?"), std::string::npos) << message("pubmed");
  EXPECT_NE(message("litcov1d").find("did you mean litcovid?"), std::string::npos) << message("litcov1d");
  EXPECT_EQ(message("nope").find("did you mean"), std::string::npos) << message("nope");  // 3 edits from hoc
  EXPECT_EQ(message("xyz").find("did you mean"), std::string::npos) << message("xyz");
}

TEST(ClosestName, FewEditsOrAPrefixEitherWay) {
  EXPECT_EQ(edit_distance("kitten", "sitting"), 3u);
  EXPECT_EQ(edit_distance("", "abc"), 3u);
  EXPECT_EQ(edit_distance("same", "same"), 0u);
  const std::vector<std::string> commands = {"eval", "estimate", "info", "serve", "score"};
  EXPECT_EQ(closest_name("evaluate", commands), "eval");   // begins with a command
  EXPECT_EQ(closest_name("esti", commands), "estimate");   // a command begins with it
  EXPECT_EQ(closest_name("servr", commands), "serve");     // 1 edit of 5
  EXPECT_EQ(closest_name("sevre", commands), "");          // 2 edits of 5 are too many
  EXPECT_EQ(closest_name("nfo", commands), "info");        // 1 edit (at least one allowed)
  EXPECT_EQ(closest_name("xyz", commands), "");
  EXPECT_EQ(closest_name("ev", commands), "");             // too short to be a prefix, 2 edits from eval
  EXPECT_EQ(closest_name("--modle", {"--model", "--quant"}), "--model");
}

TEST(EvalTasks, NerReaderCountsSentencesAndEntities) {
  REQUIRE_DATA();
  // benchmarks.md: sample200 = 200 sentences, BC5CDR 317 entities, NCBI 328.
  for (const auto& [name, entities] : std::map<std::string, size_t>{{"bc5cdr-chem", 317}, {"ncbi-disease", 328}}) {
    const auto examples = read_split(find_task(name), data_dir(), "sample200");
    ASSERT_EQ(examples.size(), 200u) << name;
    size_t n = 0;
    for (const auto& ex : examples) {
      n += ex.gold.spans.size();
      EXPECT_EQ(ex.text.find("  "), std::string::npos);
    }
    EXPECT_EQ(n, entities) << name;
    EXPECT_EQ(examples.front().id, "0");
    EXPECT_EQ(examples.back().id, "199");
  }
  // The first BC5CDR sentence starts "Two hundred four people with epilepsy".
  const auto ex = read_split(find_task("bc5cdr-chem"), data_dir(), "sample200").front();
  EXPECT_EQ(ex.tokens[0], "Two");
  EXPECT_EQ(ex.text.substr(0, 37), "Two hundred four people with epilepsy");
}

TEST(EvalTasks, BioSpansAreMaximalRuns) {
  EXPECT_EQ(spans_from_bio({"O", "B", "I", "O", "B", "B", "I", "I"}),
            (std::vector<Span>{{1, 3}, {4, 5}, {5, 8}}));
  EXPECT_EQ(spans_from_bio({"I", "I", "O", "I"}), (std::vector<Span>{{0, 2}, {3, 4}}));  // I without B starts one
  EXPECT_TRUE(spans_from_bio({"O", "O"}).empty());
}

TEST(EvalTasks, RelationReaderKeepsIdsUniqueAndLabelsCanonical) {
  REQUIRE_DATA();
  const auto chem = read_split(find_task("chemprot"), data_dir(), "sample200");
  ASSERT_EQ(chem.size(), 200u);
  EXPECT_EQ(chem.front().id, "21058326.T1.T14");
  EXPECT_EQ(chem.front().gold.labels, std::vector<std::string>{"false"});
  size_t negatives = 0;
  for (const auto& ex : chem) negatives += ex.gold.labels.front() == "false";
  EXPECT_EQ(negatives, 20u);  // benchmarks.md: rebalanced, only 20 negatives
  // ChemProt dev repeats 4 index values (with other labels): later copies get "#2".
  const auto dev = read_split(find_task("chemprot"), data_dir(), "dev");
  std::set<std::string> ids;
  size_t suffixed = 0;
  for (const auto& ex : dev) {
    ids.insert(ex.id);
    suffixed += ex.id.find('#') != std::string::npos;
  }
  EXPECT_EQ(ids.size(), dev.size());
  EXPECT_EQ(suffixed, 4u);
  EXPECT_EQ(read_split(find_task("ddi2013"), data_dir(), "test").size(), 5761u);
}

TEST(EvalTasks, MultilabelReaderHonoursQuotes) {
  REQUIRE_DATA();
  const auto hoc = read_split(find_task("hoc"), data_dir(), "sample200");
  ASSERT_EQ(hoc.size(), 200u);
  // pmid 23055798's abstract is quoted and holds "" (an escaped quote) inside.
  bool found = false;
  for (const auto& ex : hoc)
    if (ex.id == "23055798") {
      found = true;
      EXPECT_EQ(ex.text.rfind("Certain mutations in BRCA1", 0), 0u) << ex.text.substr(0, 40);
      EXPECT_NE(ex.text.find("an event known as a \" bottleneck \""), std::string::npos);
    }
  EXPECT_TRUE(found);
  EXPECT_EQ(hoc.front().gold.labels,
            (std::vector<std::string>{"activating invasion and metastasis", "sustaining proliferative signaling"}));
  const auto lit = read_split(find_task("litcovid"), data_dir(), "test");
  EXPECT_EQ(lit.size(), 2500u);
}

TEST(EvalTasks, QaReaders) {
  REQUIRE_DATA();
  const auto medqa = read_split(find_task("medqa"), data_dir(), "test");
  ASSERT_EQ(medqa.size(), 1273u);
  EXPECT_EQ(medqa.front().option_letters, (std::vector<std::string>{"A", "B", "C", "D"}));
  EXPECT_EQ(medqa.front().id, "0");
  const auto five = read_split(find_task("medqa"), data_dir(), "test_5options");
  EXPECT_EQ(five.front().option_letters.size(), 5u);
  EXPECT_EQ(find_task("medqa").split("test_5options").fewshot, "dev_5options");
  const auto pqa = read_split(find_task("pubmedqa"), data_dir(), "sample200");
  ASSERT_EQ(pqa.size(), 200u);
  EXPECT_EQ(pqa.front().text, "Is the urinary biomarkers assessment a non-invasive approach to tubular lesions of the solitary kidney?");
  EXPECT_EQ(pqa.front().context.rfind("The solitary kidney (SK) is currently debated", 0), 0u);
  EXPECT_EQ(pqa.front().context_raw.front(), '[');
  EXPECT_EQ(read_split(find_task("pubmedqa"), data_dir(), "test").size(), 500u);
}

TEST(EvalTasks, PythonStringLists) {
  EXPECT_EQ(parse_python_string_list("['a', \"b'c\", 'd\\'e', 'x\\u2009y']"),
            (std::vector<std::string>{"a", "b'c", "d'e", "x\xE2\x80\x89y"}));
  EXPECT_TRUE(parse_python_string_list("[]").empty());
  EXPECT_THROW(parse_python_string_list("['a'"), Error);
  EXPECT_THROW(parse_python_string_list("a, b"), Error);
}

TEST(EvalTasks, MissingDataAndSplitsAreClearErrors) {
  const TaskSpec& hoc = find_task("hoc");
  try {
    resolve_data_dir(std::string("/nonexistent/dir"), hoc);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("HoC/"), std::string::npos) << e.what();
  }
  try {
    hoc.split("validation");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("sample200"), std::string::npos) << e.what();
  }
  test::TempDir dir;
  std::filesystem::create_directories(dir.path() + "/HoC");
  EXPECT_THROW(read_split(hoc, dir.path(), "test"), Error);  // directory without the file
  test::write_file(dir.file("HoC/test.tsv"), "pmid\ttext\tlabels\n1\tsome text\tnot a hallmark\n");
  try {
    read_split(hoc, dir.path(), "test");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("test.tsv:2"), std::string::npos) << e.what();
  }
  test::write_file(dir.file("HoC/test.tsv"), "pmid\ttext\tlabels\n1\t\"unterminated\tx\n");
  EXPECT_THROW(read_split(hoc, dir.path(), "test"), Error);

  // MedQA's JSON lines: CRLF ends and blank lines are fine (ids count the questions); a broken line is named.
  const TaskSpec& medqa = find_task("medqa");
  const std::string file = dir.path() + "/" + medqa.data_dir + "/" + medqa.split("test").file;
  std::filesystem::create_directories(std::filesystem::path(file).parent_path());
  const std::string q = R"({"question": "Q?", "options": {"A": "yes", "B": "no"}, "answer_idx": "B"})";
  test::write_file(file, q + "\r\n\r\n" + q + "\r\n");
  const auto read = read_split(medqa, dir.path(), "test");
  ASSERT_EQ(read.size(), 2u);
  EXPECT_EQ(read[1].id, "1");
  EXPECT_EQ(read[1].option_texts, (std::vector<std::string>{"yes", "no"}));
  EXPECT_EQ(read[1].gold.labels, (std::vector<std::string>{"B"}));
  test::write_file(file, q + "\n{\"question\": \n");
  EXPECT_EQ(test::error_of([&] { read_split(medqa, dir.path(), "test"); }),
            file + ":2: not valid JSON (expected {question, options: {A: ...}, answer_idx})");
  test::write_file(file, q + "\n" + R"({"question": "Q?", "options": {"A": "yes"}, "answer_idx": "C"})");
  EXPECT_EQ(test::error_of([&] { read_split(medqa, dir.path(), "test"); }),
            file + ":2: answer_idx \"C\" is not one of the options");
}

TEST(EvalTasks, UserTaskFromADescriptionFile) {
  test::TempDir dir;
  std::filesystem::create_directories(dir.path() + "/Sentiment");
  test::write_file(dir.file("Sentiment/test.tsv"), "id\tsentence\tlabel\na1\tGood drug.\tpositive\na2\tBad drug.\tnegative\n");
  test::write_file(dir.file("sentiment.json"), R"({"name": "drug-sentiment", "family": "relation", "data_dir": "Sentiment",
    "reader": "tsv", "columns": {"id": "id", "text": "sentence", "label": "label"},
    "splits": {"test": "test.tsv"}, "metric": "macro_f1", "labels": ["positive", "negative"],
    "instruction": "Classify the sentiment."})");
  const TaskSpec t = load_task_file(dir.file("sentiment.json"));
  EXPECT_EQ(t.default_split, "test");
  const auto ex = read_split(t, dir.path(), "test");
  ASSERT_EQ(ex.size(), 2u);
  EXPECT_EQ(ex[1].id, "a2");
  EXPECT_EQ(ex[1].gold.labels, std::vector<std::string>{"negative"});
  // Broken descriptions fail at load with the reason.
  auto bad = [&](const std::string& text, const std::string& expect) {
    test::write_file(dir.file("bad.json"), text);
    try {
      load_task_file(dir.file("bad.json"));
      ADD_FAILURE() << "accepted: " << text;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(expect), std::string::npos) << e.what();
    }
  };
  bad("{", "malformed JSON");
  bad(R"({"name": "x", "family": "summarisation"})", "unknown task family");
  bad(R"({"name": "x", "family": "relation", "data_dir": "d", "reader": "tsv", "splits": {"test": "t.tsv"},
          "metric": "macro_f1", "instruction": "i", "columns": {"text": "s", "label": "l"}, "labels": ["a"]})",
      "at least 2 labels");
  bad(R"({"name": "x", "family": "ner", "data_dir": "d", "reader": "conll", "splits": {"test": "t.tsv"},
          "metric": "entity_f1"})", "instruction");
  bad(R"({"name": "x", "family": "ner", "data_dir": "d", "reader": "conll", "splits": {"test": "t.tsv"},
          "default_split": "dev", "metric": "entity_f1", "instruction": "i"})", "no split \"dev\"");
}

TEST(EvalPrompts, FewShotDrawIsSeededAndNeverAnEvaluatedExample) {
  std::vector<Example> pool(50);
  for (size_t i = 0; i < pool.size(); ++i) pool[i].id = std::to_string(i);
  const std::set<std::string> evaluated = {"0", "1", "2", "3", "4", "5", "6", "7", "8", "9"};
  const auto a = choose_fewshot(pool, 5, 7, evaluated);
  const auto b = choose_fewshot(pool, 5, 7, evaluated);
  const auto c = choose_fewshot(pool, 5, 8, evaluated);
  ASSERT_EQ(a.size(), 5u);
  std::vector<std::string> ia, ib, ic;
  for (size_t i = 0; i < 5; ++i) {
    ia.push_back(a[i].id), ib.push_back(b[i].id), ic.push_back(c[i].id);
    EXPECT_FALSE(evaluated.count(a[i].id));
  }
  EXPECT_EQ(ia, ib);
  EXPECT_NE(ia, ic);
  EXPECT_EQ(std::set<std::string>(ia.begin(), ia.end()).size(), 5u);
  EXPECT_THROW(choose_fewshot(pool, 41, 7, evaluated), Error);
}

// few-shot-similar's retrieval: BM25 (k1 1.2, b 0.75). By hand for "Aspirin-induced asthma" over the
// pool below (5 texts, mean length 3.8 words): idf aspirin ln(1 + 1.5/4.5) = 0.2877, induced ln(2.4) =
// 0.8755, asthma ln(1 + 2.5/3.5) = 0.5390; a 3-word text's matches weigh 2.2 / (1 + 1.2 (0.25 + 0.75 *
// 3/3.8)) = 1.0942, a 6-word one's 0.8085. So p0 = p4 = 1.8626 (a tie: the earlier first), p3 = 0.6684,
// p2 = 0.3148, p1 = 0.
TEST(EvalPrompts, SimilarShotsAreTheBm25Closest) {
  EXPECT_EQ(similarity_words("IL-6 Receptor (IL6R), \xce\xb1-synuclein"),
            (std::vector<std::string>{"il", "6", "receptor", "il6r", "\xce\xb1", "synuclein"}));
  const std::vector<std::string> texts = {"aspirin induced asthma", "cisplatin nephrotoxicity in rats",
                                          "aspirin and bleeding", "asthma after aspirin use in adults",
                                          "Aspirin induced asthma"};
  std::vector<Example> pool(texts.size());
  const char* const names[] = {"p0", "p1", "p2", "p3", "p4"};
  for (size_t i = 0; i < pool.size(); ++i) pool[i].id = names[i];
  const SimilarShots similar(pool, texts);
  const auto ids = [&](const std::string& query, int k, const std::set<std::string>& exclude) {
    std::vector<std::string> out;
    for (const Example& e : similar.choose(query, k, exclude)) out.push_back(e.id);
    return out;
  };
  EXPECT_EQ(ids("Aspirin-induced asthma", 3, {}), (std::vector<std::string>{"p3", "p4", "p0"}));  // closest last
  EXPECT_EQ(ids("Aspirin-induced asthma", 2, {"p0"}), (std::vector<std::string>{"p3", "p4"}));
  EXPECT_EQ(ids("Aspirin-induced asthma", 5, {}), (std::vector<std::string>{"p1", "p2", "p3", "p4", "p0"}));
  EXPECT_EQ(ids("zzz", 2, {}), (std::vector<std::string>{"p1", "p0"}));  // nothing shared: pool order
  EXPECT_THROW(similar.choose("aspirin", 6, {}), Error);
  EXPECT_THROW(similar.choose("aspirin", 5, {"p1"}), Error);
}

TEST(EvalPrompts, PromptsShareTheirPrefixAndEndWithTheCue) {
  REQUIRE_DATA();
  const TaskSpec& task = find_task("chemprot");
  const auto examples = read_split(task, data_dir(), "sample200");
  const auto pool = read_split(task, data_dir(), "dev");
  const auto shots = choose_fewshot(pool, 2, 1234, {});
  PromptOptions o;
  o.method = PromptMethod::few_shot;
  const std::string p0 = build_prompt(task, o, shots, examples[0]);
  const std::string p1 = build_prompt(task, o, shots, examples[1]);
  const std::string shared = p0.substr(0, p0.find("Now the input to answer:"));
  EXPECT_EQ(p1.substr(0, shared.size()), shared);
  EXPECT_NE(shared.find(shots[0].text), std::string::npos);
  EXPECT_NE(shared.find("Relation: " + shots[0].gold.labels[0]), std::string::npos);
  EXPECT_EQ(p0.substr(p0.size() - 9), "Relation:");
  EXPECT_NE(p0.find(examples[0].text), std::string::npos);
  o.chat = true;
  const std::string chat = build_prompt(task, o, shots, examples[0]);
  EXPECT_EQ(chat.substr(chat.size() - examples[0].text.size()), examples[0].text);  // no cue in a chat turn
  o.method = PromptMethod::cot;
  EXPECT_NE(build_prompt(task, o, {}, examples[0]).find(kChainOfThoughtInstruction), std::string::npos);
}

TEST(EvalPrompts, GoldAnswersInTheStudysFormats) {
  REQUIRE_DATA();
  const auto ner = read_split(find_task("bc5cdr-chem"), data_dir(), "sample200");
  const auto ex = ner[0];  // "... antiepileptic drug therapy ..." with one chemical entity
  const std::string html = render_gold_answer(find_task("bc5cdr-chem"), ex);
  EXPECT_NE(html.find("<span class=\"chemical\">" + ex.tokens[static_cast<size_t>(ex.gold.spans[0].begin)]),
            std::string::npos) << html;
  const auto hoc = read_split(find_task("hoc"), data_dir(), "sample200");
  const auto j = nlohmann::json::parse(render_gold_answer(find_task("hoc"), hoc[0]));
  EXPECT_EQ(j.size(), 10u);
  EXPECT_EQ(j["activating invasion and metastasis"], 1);
  EXPECT_EQ(j["resisting cell death"], 0);
  const auto medqa = read_split(find_task("medqa"), data_dir(), "test");
  EXPECT_EQ(render_gold_answer(find_task("medqa"), medqa[0]), medqa[0].gold.labels[0]);
}

TEST(EvalPrompts, AnswerPlansCoverTheLabelSets) {
  const TaskSpec& hoc = find_task("hoc");
  Example ex;
  const auto plan = answer_plan(hoc, ex);
  ASSERT_EQ(plan.size(), 21u);  // 10 x (key, choice) + closing brace
  EXPECT_EQ(plan[1].choices, (std::vector<std::string>{"0", "1"}));
  std::string all_zero;
  for (const auto& seg : plan) all_zero += seg.choices.empty() ? seg.fixed : "0";
  EXPECT_EQ(all_zero, render_gold_answer(hoc, ex));  // the same JSON layout as the study's answers
  EXPECT_EQ(answer_plan(find_task("chemprot"), ex).front().choices, find_task("chemprot").labels);
  EXPECT_TRUE(answer_plan(find_task("ncbi-disease"), ex).empty());
}

}  // namespace
}  // namespace bioquant::eval
