// `bioquant eval`, `score` and `compare-runs` end to end: gold answers score 1.0, constant answers
// score their hand-computed value, every method and scoring mode runs on the shipped model,
// interrupted runs resume, an OpenAI-compatible server on loopback is evaluated, and bad input gets
// one-line errors without damaging earlier results.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <thread>

#include <httplib.h>
#include <nlohmann/json.hpp>

#include "bioquant/eval/prompts.h"
#include "bioquant/eval/scoring.h"
#include "bioquant/eval/stats.h"
#include "bioquant/eval/store.h"
#include "bioquant/eval/task.h"
#include "bioquant/kernels/cuda/gpu_decoder.h"
#include "test_util.h"

namespace bioquant::eval {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

std::string data_dir() {
  const std::string shared = test::shared_dir();
  return shared.empty() ? "" : shared + "/bionlp";
}
std::string demo_model() { return test::fixtures_dir() + "/../../models/biomed-tiny"; }

#define REQUIRE_DATA()                                              \
  if (data_dir().empty()) GTEST_SKIP() << "../shared/bionlp not present"

std::vector<json> read_lines(const std::string& path) {
  std::vector<json> out;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line))
    if (!line.empty()) out.push_back(json::parse(line));
  return out;
}

// Writes {"id", "output"} lines, one per example, the output made by `answer`.
template <typename F>
std::string write_outputs(const test::TempDir& dir, const std::vector<Example>& examples, F answer) {
  const std::string path = dir.file("outputs.jsonl");
  std::ofstream out(path);
  for (const auto& ex : examples) out << json{{"id", ex.id}, {"output", answer(ex)}}.dump() << '\n';
  return path;
}

json score(const std::string& task, const std::string& outputs, const std::string& split = "") {
  std::vector<std::string> args = {"score", "--task", task, "--data-dir", data_dir(), "--outputs", outputs, "--json"};
  if (!split.empty()) args.insert(args.end(), {"--split", split});
  const auto r = test::run_cli(args);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return json::parse(r.out);
}

TEST(EvalCli, GoldAnswersInTheStudysFormatsScoreOne) {
  REQUIRE_DATA();
  for (const auto& t : all_tasks()) {
    if (t.source != "builtin") continue;
    const auto examples = read_split(t, data_dir(), t.default_split);
    test::TempDir dir;
    const auto path = write_outputs(dir, examples, [&](const Example& ex) { return render_gold_answer(t, ex); });
    const json s = score(t.name, path);
    EXPECT_EQ(s["task"], t.name);
    EXPECT_EQ(s["n"], examples.size()) << t.name;
    EXPECT_EQ(s["score"], 1.0) << t.name;
    EXPECT_EQ(s["unparsed"], 0) << t.name;
    EXPECT_EQ(s["ci95"][0], 1.0) << t.name;
    EXPECT_EQ(s["ci95"][1], 1.0) << t.name;
    EXPECT_EQ(s["metric"], t.metric);
  }
}

TEST(EvalCli, ConstantAnswersScoreTheirHandComputedValue) {
  REQUIRE_DATA();
  test::TempDir dir;
  // ChemProt sample200 answered "false" throughout: 20 of 200 gold are false (benchmarks.md).
  // F1(false) = 2PR/(P+R) with P = 20/200, R = 1 -> 2*0.1/1.1 = 0.181818...; other 5 classes 0;
  // macro over 6 labels = 0.0303030...; accuracy 0.1.
  {
    const auto ex = read_split(find_task("chemprot"), data_dir(), "sample200");
    const json s = score("chemprot", write_outputs(dir, ex, [](const Example&) { return "false"; }));
    EXPECT_NEAR(s["score"].get<double>(), (2 * 0.1 / 1.1) / 6, 1e-12);
    EXPECT_NEAR(s["accuracy"].get<double>(), 0.1, 1e-12);
    EXPECT_EQ(s["unparsed"], 0);
  }
  // PubMedQA sample200 answered "yes": accuracy = (#yes gold)/200, counted here from the raw file.
  {
    std::ifstream in(data_dir() + "/PubMedQA/sample200.tsv");
    std::string line;
    std::getline(in, line);
    size_t yes = 0, n = 0;
    // final_decision is the 8th column; a CONTEXTS cell never holds a tab, so split on tabs.
    while (std::getline(in, line)) {
      size_t col = 0, start = 0;
      for (size_t i = 0; i <= line.size(); ++i)
        if (i == line.size() || line[i] == '\t') {
          if (col == 7) yes += line.substr(start, i - start) == "yes", ++n;
          ++col, start = i + 1;
        }
    }
    ASSERT_EQ(n, 200u);
    const auto ex = read_split(find_task("pubmedqa"), data_dir(), "sample200");
    const json s = score("pubmedqa", write_outputs(dir, ex, [](const Example&) { return "Yes."; }));
    EXPECT_NEAR(s["score"].get<double>(), static_cast<double>(yes) / 200.0, 1e-12);
    // macro F1 over yes/no/maybe: only "yes" has predictions; F1(yes) = 2p/(p+1) with p = yes/200.
    const double p = static_cast<double>(yes) / 200.0;
    EXPECT_NEAR(s["macro_f1"].get<double>(), (2 * p / (p + 1)) / 3, 1e-12);
  }
  // MedQA test answered "A": accuracy = (#answer_idx A)/1273 counted from the raw file.
  {
    std::ifstream in(data_dir() + "/MedQA/test.jsonl");
    std::string line;
    size_t a = 0, n = 0;
    while (std::getline(in, line)) {
      if (line.empty()) continue;
      ++n;
      a += json::parse(line)["answer_idx"] == "A";
    }
    const auto ex = read_split(find_task("medqa"), data_dir(), "test");
    const json s = score("medqa", write_outputs(dir, ex, [](const Example&) { return "The answer is A."; }));
    EXPECT_NEAR(s["score"].get<double>(), static_cast<double>(a) / static_cast<double>(n), 1e-12);
  }
  // HoC answered with every hallmark 1: per-label F1 = 2*s/(s+200) for s gold documents of that
  // label (P = s/200, R = 1); the score is their mean. An all-zero answer scores 0.
  {
    const TaskSpec& hoc = find_task("hoc");
    const auto ex = read_split(hoc, data_dir(), "sample200");
    std::map<std::string, double> support;
    for (const auto& e : ex)
      for (const auto& l : e.gold.labels) support[l] += 1;
    double expected = 0;
    for (const auto& l : hoc.labels) expected += 2 * support[l] / (support[l] + 200.0);
    expected /= 10;
    Example all;
    all.gold.labels = hoc.labels;
    const std::string ones = render_gold_answer(hoc, all);
    const json s = score("hoc", write_outputs(dir, ex, [&](const Example&) { return ones; }));
    EXPECT_NEAR(s["score"].get<double>(), expected, 1e-12);
    const json z = score("hoc", write_outputs(dir, ex, [&](const Example&) { return "{}"; }));
    EXPECT_EQ(z["score"], 0.0);
  }
  // NER answered with the sentence unmarked: nothing predicted, P = R = F1 = 0, all parsed.
  {
    const auto ex = read_split(find_task("ncbi-disease"), data_dir(), "sample200");
    const json s = score("ncbi-disease", write_outputs(dir, ex, [](const Example& e) { return e.text; }));
    EXPECT_EQ(s["score"], 0.0);
    EXPECT_EQ(s["predicted"], 0);
    EXPECT_EQ(s["gold"], 328);
    EXPECT_EQ(s["unparsed"], 0);
  }
}

test::CliResult run_eval(const std::string& out, std::vector<std::string> extra) {
  std::vector<std::string> args = {"eval", "--model", demo_model(), "--data-dir", data_dir(), "--out", out,
                                   "--threads", "2", "--quiet"};
  args.insert(args.end(), extra.begin(), extra.end());
  return test::run_cli(args);
}

TEST(EvalCli, EveryMethodAndScoringModeRunsOnAllTasks) {
  REQUIRE_DATA();
  for (const std::string method : {"zero-shot", "few-shot", "cot"}) {
    for (const std::string scoring : {"generate", "constrained", "loglik"}) {
      SCOPED_TRACE(method + " / " + scoring);
      test::TempDir dir;
      const auto r = run_eval(dir.file("out"), {"--tasks", "all", "--limit", "5", "--method", method, "--shots", "2",
                                                "--scoring", scoring, "--max-new-tokens", "24", "--db",
                                                dir.file("runs.sqlite")});
      ASSERT_EQ(r.exit_code, 0) << r.err;
      const json res = json::parse(test::read_file(dir.file("out/results.json")));
      ASSERT_EQ(res["tasks"].size(), 8u);
      for (const auto& [name, t] : res["tasks"].items()) {
        EXPECT_EQ(t["n"], 5) << name;
        EXPECT_EQ(t["method"], method);
        EXPECT_GE(t["score"].get<double>(), 0.0);
        EXPECT_LE(t["score"].get<double>(), 1.0);
        const bool ner = name == "bc5cdr-chem" || name == "ncbi-disease";
        EXPECT_EQ(t["scoring"], ner ? "generate" : scoring) << name;
        // Constrained and loglik answers are valid by construction: nothing unparsed.
        if (!ner && scoring != "generate") {
          EXPECT_EQ(t["unparsed"], 0) << name;
        }
        // Examples after the first reuse the shared instruction (+ shots) from the KV cache.
        EXPECT_GT(t["prompt_tokens_reused"].get<int64_t>(), 0) << name;
        const auto lines = read_lines(dir.file("out/samples/" + name + ".jsonl"));
        ASSERT_EQ(lines.size(), 5u);
        for (const auto& l : lines)
          for (const char* key : {"id", "prompt", "output", "parsed", "gold", "correct"}) EXPECT_TRUE(l.contains(key)) << key;
        if (method == "few-shot") {
          EXPECT_EQ(t["fewshot_ids"].size(), 2u);
        }
      }
      const auto rows = read_runs(dir.file("runs.sqlite"));
      ASSERT_EQ(rows.size(), 8u);
      EXPECT_EQ(rows[0]["task"], "bc5cdr-chem");
      EXPECT_EQ(rows[0]["method"], method);
      EXPECT_EQ(rows[0]["config_hash"].get<std::string>().size(), 16u);
      EXPECT_GT(rows[0]["peak_rss_bytes"].get<int64_t>(), 0);
      EXPECT_TRUE(rows[0]["gpu_peak_bytes"].is_null());  // a CPU run
    }
  }
}

TEST(EvalCli, FewShotReusesTheSharedPrefix) {
  REQUIRE_DATA();
  test::TempDir dir;
  const auto r = run_eval(dir.file("out"), {"--tasks", "chemprot", "--limit", "6", "--method", "few-shot", "--shots",
                                            "3", "--scoring", "loglik", "--no-db"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const json t = json::parse(test::read_file(dir.file("out/results.json")))["tasks"]["chemprot"];
  const int64_t reused = t["prompt_tokens_reused"], computed = t["prompt_tokens_computed"];
  // The instruction + 3 shots are computed once and reused by the 5 later examples: reuse dominates.
  EXPECT_GT(reused, computed) << "reused " << reused << " computed " << computed;
}

// few-shot-similar: each example is shown its own most similar training examples; `prompts` shows the
// very prompts and shots that `eval` feeds and records, and the run is told apart from few-shot's.
TEST(EvalCli, FewShotSimilarShowsEachExampleItsOwnClosestExamples) {
  REQUIRE_DATA();
  const auto p = test::run_cli({"prompts", "--task", "hoc", "--data-dir", data_dir(), "--method", "few-shot-similar",
                                "--shots", "2", "--limit", "3", "--model", demo_model()});  // its chat setting, as eval
  ASSERT_EQ(p.exit_code, 0) << p.err;
  std::vector<json> shown;
  std::istringstream lines(p.out);
  for (std::string line; std::getline(lines, line);) shown.push_back(json::parse(line));
  ASSERT_EQ(shown.size(), 3u);
  std::set<std::vector<std::string>> distinct;
  const TaskSpec& task = find_task("hoc");
  std::map<std::string, Example> train;
  for (const Example& e : read_split(task, data_dir(), task.split("sample200").fewshot)) train[e.id] = e;
  for (const json& l : shown) {
    const auto ids = l["shots"].get<std::vector<std::string>>();
    ASSERT_EQ(ids.size(), 2u);
    distinct.insert(ids);
    for (const std::string& id : ids) {
      ASSERT_TRUE(train.count(id)) << id;
      EXPECT_NE(l["prompt"].get<std::string>().find(train[id].text), std::string::npos) << id;
    }
  }
  EXPECT_GT(distinct.size(), 1u);  // chosen per example, not one draw

  test::TempDir dir;
  auto r = run_eval(dir.file("similar"), {"--tasks", "hoc", "--limit", "3", "--method", "few-shot-similar", "--shots",
                                          "2", "--scoring", "loglik", "--no-db"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto samples = read_lines(dir.file("similar/samples/hoc.jsonl"));
  ASSERT_EQ(samples.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(samples[i]["id"], shown[i]["id"]);
    EXPECT_EQ(samples[i]["shots"], shown[i]["shots"]);
    EXPECT_EQ(samples[i]["prompt"], shown[i]["prompt"]);
  }
  r = run_eval(dir.file("drawn"), {"--tasks", "hoc", "--limit", "3", "--method", "few-shot", "--shots", "2",
                                   "--scoring", "loglik", "--no-db"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const json a = json::parse(test::read_file(dir.file("similar/results.json")))["tasks"]["hoc"];
  const json b = json::parse(test::read_file(dir.file("drawn/results.json")))["tasks"]["hoc"];
  EXPECT_EQ(a["method"], "few-shot-similar");
  EXPECT_EQ(a["shots"], 2);
  EXPECT_NE(a["config_hash"], b["config_hash"]);
}

// --batch answers examples together; on the shipped (32-bit) model on the CPU the samples, scores
// and token counts are those of one at a time, the last group shorter than the rest included.
TEST(EvalCli, BatchedRunGivesTheOneByOneSamples) {
  REQUIRE_DATA();
  for (const std::string method : {"zero-shot", "few-shot"}) {
    SCOPED_TRACE(method);
    test::TempDir dir;
    const std::vector<std::string> common = {"--tasks", "bc5cdr-chem,hoc,pubmedqa", "--limit", "7", "--method", method,
                                             "--shots", "2", "--max-new-tokens", "24", "--no-db"};
    std::vector<std::string> one = common, three = common;
    three.insert(three.end(), {"--batch", "3"});
    auto r = run_eval(dir.file("one"), one);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    r = run_eval(dir.file("three"), three);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    const json a = json::parse(test::read_file(dir.file("one/results.json")));
    const json b = json::parse(test::read_file(dir.file("three/results.json")));
    for (const std::string task : {"bc5cdr-chem", "hoc", "pubmedqa"}) {
      const json& ta = a["tasks"][task];
      const json& tb = b["tasks"][task];
      EXPECT_EQ(ta["batch"], 1);
      EXPECT_EQ(tb["batch"], 3);
      for (const char* key : {"score", "ci95", "unparsed", "generated_tokens", "config_hash"}) EXPECT_EQ(ta[key], tb[key]) << task << " " << key;
      EXPECT_EQ(ta["prompt_tokens_computed"].get<int64_t>() + ta["prompt_tokens_reused"].get<int64_t>(),
                tb["prompt_tokens_computed"].get<int64_t>() + tb["prompt_tokens_reused"].get<int64_t>());
      EXPECT_GT(tb["prompt_tokens_reused"].get<int64_t>(), 0);
      EXPECT_EQ(read_lines(dir.file("one/samples/" + task + ".jsonl")), read_lines(dir.file("three/samples/" + task + ".jsonl")))
          << task;
    }
  }
  test::TempDir dir;
  const auto r = run_eval(dir.file("out"), {"--tasks", "hoc", "--batch", "0", "--no-db"});
  EXPECT_NE(r.exit_code, 0);
}

// Exact numerics: recorded with the run and in its config hash; the samples do not depend on how
// the examples are batched even with quantized weights (the default kernels' may, at near-ties), nor
// on the device: on a GPU machine the same run on the GPU writes the CPU's samples.
TEST(EvalCli, ExactRunsGiveTheSameSamplesBatchedAndOnEveryDevice) {
  REQUIRE_DATA();
  test::TempDir dir;
  const std::vector<std::string> common = {"--tasks", "hoc,pubmedqa", "--limit", "4", "--quant", "q4_k",
                                           "--max-new-tokens", "16", "--no-db", "--exact"};
  std::vector<std::string> batched = common, plain = common;
  batched.insert(batched.end(), {"--batch", "3"});
  plain.pop_back();  // without --exact
  auto r = run_eval(dir.file("one"), common);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = run_eval(dir.file("three"), batched);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = run_eval(dir.file("default"), plain);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const json a = json::parse(test::read_file(dir.file("one/results.json")));
  const json d = json::parse(test::read_file(dir.file("default/results.json")));
  EXPECT_EQ(a["numerics"], "exact");
  EXPECT_EQ(d["numerics"], "default");
  for (const std::string task : {"hoc", "pubmedqa"}) {
    EXPECT_NE(a["tasks"][task]["config_hash"], d["tasks"][task]["config_hash"]) << task;
    EXPECT_EQ(read_lines(dir.file("one/samples/" + task + ".jsonl")), read_lines(dir.file("three/samples/" + task + ".jsonl")))
        << task;
  }
  if (cuda_device_count() > 0) {
    std::vector<std::string> gpu = common;
    gpu.erase(std::find(gpu.begin(), gpu.end(), "--no-db"));
    gpu.insert(gpu.end(), {"--device", "cuda", "--db", dir.file("gpu.sqlite")});
    r = run_eval(dir.file("gpu"), gpu);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    for (const std::string task : {"hoc", "pubmedqa"})
      EXPECT_EQ(read_lines(dir.file("one/samples/" + task + ".jsonl")), read_lines(dir.file("gpu/samples/" + task + ".jsonl")))
          << task;
    // The card's peak use goes to results.json and to each row of the runs table (recommend --device cuda).
    const json g = json::parse(test::read_file(dir.file("gpu/results.json")));
    EXPECT_GT(g["gpu_device_peak_bytes"].get<int64_t>(), g["gpu_peak_allocated_bytes"].get<int64_t>());
    const auto rows = read_runs(dir.file("gpu.sqlite"));
    ASSERT_EQ(rows.size(), 2u);
    for (const auto& row : rows) {  // each task's row: the peak so far
      EXPECT_GT(row["gpu_peak_bytes"].get<int64_t>(), 0);
      EXPECT_LE(row["gpu_peak_bytes"].get<int64_t>(), g["gpu_device_peak_bytes"].get<int64_t>());
    }
    EXPECT_EQ(rows[1]["gpu_peak_bytes"], g["gpu_device_peak_bytes"]);  // the last task's row: the run's peak
  }
  // No exact LLM.int8 outlier path; --exact keeps an f32 cache.
  r = run_eval(dir.file("bad"), {"--tasks", "hoc", "--quant", "int8", "--int8-threshold", "6", "--exact", "--no-db"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("--exact has no LLM.int8 outlier decomposition"), std::string::npos) << r.err;
}

// Progress on stderr: examples done of the total, their rate, the ETA and the tokens generated a second.
TEST(EvalCli, ProgressShowsRateEtaAndTokensPerSecond) {
  REQUIRE_DATA();
  test::TempDir dir;
  const auto r = test::run_cli({"eval", "--model", demo_model(), "--data-dir", data_dir(), "--out", dir.file("out"),
                                "--threads", "2", "--tasks", "pubmedqa", "--limit", "3", "--no-db"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(std::regex_search(
      r.err, std::regex(R"(\[pubmedqa\] 3/3 examples  [0-9.]+ ex/s  ETA 0s  unparsed [0-3]  gen [0-9.]+ tok/s\n)")))
      << r.err;
}

TEST(EvalCli, InterruptedRunResumes) {
  REQUIRE_DATA();
  test::TempDir dir;
  const std::string out = dir.file("out");
  // A first run of 3 examples, then 6: the first 3 are not recomputed.
  auto r = run_eval(out, {"--tasks", "pubmedqa", "--limit", "3", "--no-db"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto first = read_lines(out + "/samples/pubmedqa.jsonl");
  r = run_eval(out, {"--tasks", "pubmedqa", "--limit", "6", "--no-db"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  json t = json::parse(test::read_file(out + "/results.json"))["tasks"]["pubmedqa"];
  EXPECT_EQ(t["resumed_examples"], 3);
  EXPECT_EQ(t["n"], 6);
  const auto second = read_lines(out + "/samples/pubmedqa.jsonl");
  ASSERT_EQ(second.size(), 6u);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(first[i], second[i]);
  // A run killed mid-line leaves a cut last line: it is dropped and that example recomputed.
  {
    std::string text = test::read_file(out + "/samples/pubmedqa.jsonl");
    text.resize(text.size() - 40);
    test::write_file(out + "/samples/pubmedqa.jsonl", text);
  }
  r = run_eval(out, {"--tasks", "pubmedqa", "--limit", "6", "--no-db"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  t = json::parse(test::read_file(out + "/results.json"))["tasks"]["pubmedqa"];
  EXPECT_EQ(t["resumed_examples"], 5);
  EXPECT_EQ(read_lines(out + "/samples/pubmedqa.jsonl").size(), 6u);
  // A real interruption (SIGKILL while generating), then a re-run that completes the set.
  const std::string out2 = dir.file("out2");
  const std::string cmd = "timeout -s KILL 2 '" + std::string(BIOQUANT_CLI) + "' eval --model '" + demo_model() +
                          "' --data-dir '" + data_dir() + "' --out '" + out2 +
                          "' --tasks bc5cdr-chem --limit 40 --max-new-tokens 200 --no-db --quiet > /dev/null 2>&1";
  const int status = std::system(cmd.c_str());
  const bool killed = !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  r = run_eval(out2, {"--tasks", "bc5cdr-chem", "--limit", "40", "--max-new-tokens", "200", "--no-db"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  t = json::parse(test::read_file(out2 + "/results.json"))["tasks"]["bc5cdr-chem"];
  EXPECT_EQ(t["n"], 40);
  const auto lines = read_lines(out2 + "/samples/bc5cdr-chem.jsonl");
  ASSERT_EQ(lines.size(), 40u);
  for (size_t i = 0; i < lines.size(); ++i) EXPECT_EQ(lines[i]["id"], std::to_string(i));
  if (killed) {
    EXPECT_LT(t["resumed_examples"].get<int>(), 40);
  }
}

// A minimal OpenAI-compatible server on loopback that answers each prompt with its gold answer.
class FakeOpenAIServer {
 public:
  explicit FakeOpenAIServer(std::map<std::string, std::string> answers) : answers_(std::move(answers)) {
    server_.Post("/v1/chat/completions", [this](const httplib::Request& req, httplib::Response& res) {
      const json body = json::parse(req.body);
      const std::string prompt = body["messages"][0]["content"];
      ++requests_;
      {  // requests answered at once (eval --batch sends them together)
        const int now = ++in_flight_;
        int seen = most_in_flight_.load();
        while (now > seen && !most_in_flight_.compare_exchange_weak(seen, now)) {
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(30));
      --in_flight_;
      std::string answer = "I cannot tell.";
      for (const auto& [needle, a] : answers_)
        if (prompt.find(needle) != std::string::npos) answer = a;
      json out = {{"id", "x"}, {"object", "chat.completion"},
                  {"choices", {{{"index", 0}, {"message", {{"role", "assistant"}, {"content", answer}}},
                                {"finish_reason", "stop"}}}},
                  {"usage", {{"prompt_tokens", 100}, {"completion_tokens", 3}}}};
      res.set_content(out.dump(), "application/json");
    });
    server_.Post("/broken/chat/completions", [](const httplib::Request&, httplib::Response& res) {
      res.status = 400;
      res.set_content("{\"error\": \"model not found\"}", "application/json");
    });
    port_ = server_.bind_to_any_port("127.0.0.1");
    thread_ = std::thread([this] { server_.listen_after_bind(); });
    while (!server_.is_running()) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ~FakeOpenAIServer() {
    server_.stop();
    thread_.join();
  }
  int port() const { return port_; }
  int requests() const { return requests_; }
  int most_in_flight() const { return most_in_flight_; }

 private:
  std::map<std::string, std::string> answers_;
  httplib::Server server_;
  std::thread thread_;
  int port_ = 0;
  std::atomic<int> requests_{0}, in_flight_{0}, most_in_flight_{0};
};

TEST(EvalCli, OpenAIBackendAgainstALoopbackServer) {
  REQUIRE_DATA();
  const TaskSpec& task = find_task("pubmedqa");
  auto examples = read_split(task, data_dir(), "sample200");
  examples.resize(5);
  std::map<std::string, std::string> answers;
  for (const auto& ex : examples) answers[ex.text] = "Answer: " + ex.gold.labels[0];
  FakeOpenAIServer server(answers);
  const std::string endpoint = "http://127.0.0.1:" + std::to_string(server.port()) + "/v1";
  test::TempDir dir;
  auto r = test::run_cli({"eval", "--backend", "openai", "--endpoint", endpoint, "--api-model", "served-model",
                          "--tasks", "pubmedqa", "--limit", "5", "--data-dir", data_dir(), "--out", dir.file("out"),
                          "--db", dir.file("runs.sqlite"), "--quiet"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(server.requests(), 5);
  const json t = json::parse(test::read_file(dir.file("out/results.json")))["tasks"]["pubmedqa"];
  EXPECT_EQ(t["score"], 1.0);
  EXPECT_EQ(t["prompt_tokens_computed"], 500);
  EXPECT_EQ(read_runs(dir.file("runs.sqlite"))[0]["backend"], "openai " + endpoint);
  EXPECT_EQ(server.most_in_flight(), 1);
  // --batch 4: the requests go together (a batching server decodes them together); the same answers.
  r = test::run_cli({"eval", "--backend", "openai", "--endpoint", endpoint, "--tasks", "pubmedqa", "--limit", "5",
                     "--data-dir", data_dir(), "--out", dir.file("batched"), "--no-db", "--quiet", "--batch", "4"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(server.requests(), 10);
  EXPECT_GE(server.most_in_flight(), 2);
  EXPECT_LE(server.most_in_flight(), 4);
  const json tb = json::parse(test::read_file(dir.file("batched/results.json")))["tasks"]["pubmedqa"];
  EXPECT_EQ(tb["score"], 1.0);
  EXPECT_EQ(tb["prompt_tokens_computed"], 500);
  EXPECT_EQ(read_lines(dir.file("batched/samples/pubmedqa.jsonl")), read_lines(dir.file("out/samples/pubmedqa.jsonl")));
  // Scoring modes that need logits are refused with a reason; so are server errors.
  r = test::run_cli({"eval", "--backend", "openai", "--endpoint", endpoint, "--tasks", "pubmedqa", "--limit", "1",
                     "--data-dir", data_dir(), "--out", dir.file("o2"), "--no-db", "--scoring", "loglik"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("needs a local model"), std::string::npos) << r.err;
  r = test::run_cli({"eval", "--backend", "openai", "--endpoint",
                     "http://127.0.0.1:" + std::to_string(server.port()) + "/broken", "--tasks", "pubmedqa",
                     "--limit", "1", "--data-dir", data_dir(), "--out", dir.file("o3"), "--no-db"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("HTTP 400"), std::string::npos) << r.err;
  EXPECT_EQ(r.err.find("/v1"), std::string::npos) << r.err;  // not a 404: no hint
  // The base URL without /v1: the server's 404, and the likely fix.
  const std::string bare = "http://127.0.0.1:" + std::to_string(server.port());
  r = test::run_cli({"eval", "--backend", "openai", "--endpoint", bare, "--tasks", "pubmedqa", "--limit", "1",
                     "--data-dir", data_dir(), "--out", dir.file("o4"), "--no-db"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("HTTP 404"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("try --endpoint " + bare + "/v1)\n"), std::string::npos) << r.err;
}

TEST(EvalCli, CompareRunsGivesPairedDifferenceAndFlips) {
  REQUIRE_DATA();
  test::TempDir dir;
  ASSERT_EQ(run_eval(dir.file("a"), {"--tasks", "medqa,pubmedqa", "--limit", "12", "--scoring", "loglik", "--no-db"})
                .exit_code, 0);
  ASSERT_EQ(run_eval(dir.file("b"), {"--tasks", "medqa,pubmedqa", "--limit", "12", "--scoring", "loglik", "--quant",
                                     "q4_0", "--quant-policy", "all", "--no-db"})
                .exit_code, 0);
  auto r = test::run_cli({"compare-runs", dir.file("a"), dir.file("b"), "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const json c = json::parse(r.out);
  ASSERT_EQ(c["tasks"].size(), 2u);
  for (const auto& [name, t] : c["tasks"].items()) {
    const json ra = json::parse(test::read_file(dir.file("a/results.json")))["tasks"][name];
    const json rb = json::parse(test::read_file(dir.file("b/results.json")))["tasks"][name];
    EXPECT_DOUBLE_EQ(t["score_a"].get<double>(), ra["score"].get<double>());
    EXPECT_DOUBLE_EQ(t["score_b"].get<double>(), rb["score"].get<double>());
    EXPECT_DOUBLE_EQ(t["diff"].get<double>(), rb["score"].get<double>() - ra["score"].get<double>());
    EXPECT_LE(t["ci95"][0].get<double>(), t["diff"].get<double>());
    EXPECT_GE(t["ci95"][1].get<double>(), t["diff"].get<double>());
    // Flips counted from the sample files directly.
    const auto la = read_lines(dir.file("a/samples/" + name + ".jsonl"));
    const auto lb = read_lines(dir.file("b/samples/" + name + ".jsonl"));
    int r2w = 0, w2r = 0;
    for (size_t i = 0; i < la.size(); ++i) {
      r2w += la[i]["correct"].get<bool>() && !lb[i]["correct"].get<bool>();
      w2r += !la[i]["correct"].get<bool>() && lb[i]["correct"].get<bool>();
    }
    EXPECT_EQ(t["right_to_wrong"], r2w) << name;
    EXPECT_EQ(t["wrong_to_right"], w2r) << name;
    EXPECT_EQ(t["n"], 12);
  }
  // The mean over the two tasks: the stratified paired bootstrap of the sample files, tasks in name order.
  std::vector<eval::PairedTask> tasks;
  for (const char* name : {"medqa", "pubmedqa"}) {
    eval::PairedTask t{eval::MetricKind::accuracy, {}, {}, {}, {}};
    const auto la = read_lines(dir.file(std::string("a/samples/") + name + ".jsonl"));
    const auto lb = read_lines(dir.file(std::string("b/samples/") + name + ".jsonl"));
    for (size_t i = 0; i < la.size(); ++i) {
      t.gold.push_back(eval::gold_from_json(la[i]["gold"]));
      t.a.push_back(eval::prediction_from_json(la[i]["parsed"]));
      t.b.push_back(eval::prediction_from_json(lb[i]["parsed"]));
    }
    tasks.push_back(std::move(t));
  }
  const eval::MeanDifference expected = eval::compare_paired_mean(tasks, 1000, 1234);
  const json& mean = c["mean"];
  EXPECT_EQ(mean["tasks"], 2);
  EXPECT_EQ(mean["n"], 24);
  EXPECT_EQ(mean["diff"].get<double>(), expected.diff);
  EXPECT_EQ(mean["ci95"][0].get<double>(), expected.ci.low);
  EXPECT_EQ(mean["ci95"][1].get<double>(), expected.ci.high);
  EXPECT_EQ(mean["p_value"].get<double>(), expected.p_value);
  const json& mq = c["tasks"]["medqa"];
  const json& pq = c["tasks"]["pubmedqa"];
  EXPECT_NEAR(mean["diff"].get<double>(), (mq["diff"].get<double>() + pq["diff"].get<double>()) / 2, 1e-12);
  EXPECT_NEAR(mean["score_b"].get<double>(), (mq["score_b"].get<double>() + pq["score_b"].get<double>()) / 2, 1e-12);
  r = test::run_cli({"compare-runs", dir.file("a"), dir.file("b")});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("\nmean of 2 "), std::string::npos) << r.out;
  // One task: no mean.
  r = test::run_cli({"compare-runs", dir.file("a"), dir.file("b"), "--tasks", "medqa", "--json"});
  EXPECT_FALSE(json::parse(r.out).contains("mean"));
  // A run against itself: no difference, no flips.
  r = test::run_cli({"compare-runs", dir.file("a"), dir.file("a"), "--json"});
  const json same = json::parse(r.out);
  EXPECT_EQ(same["tasks"]["medqa"]["diff"], 0.0);
  EXPECT_EQ(same["tasks"]["medqa"]["right_to_wrong"], 0);
  EXPECT_EQ(same["tasks"]["medqa"]["p_value"], 1.0);
  EXPECT_EQ(same["mean"]["diff"], 0.0);
  EXPECT_EQ(same["mean"]["p_value"], 1.0);
}

void expect_error(const test::CliResult& r, const std::string& fragment) {
  EXPECT_NE(r.exit_code, 0);
  EXPECT_TRUE(r.out.empty()) << r.out;
  EXPECT_EQ(r.err.rfind("error: ", 0), 0u) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_NE(r.err.find(fragment), std::string::npos) << r.err;
}

TEST(EvalCli, BadInputGivesOneLineErrors) {
  REQUIRE_DATA();
  test::TempDir dir;
  const std::string dd = data_dir();
  expect_error(test::run_cli({"score", "--task", "chemprott", "--data-dir", dd, "--outputs", dir.file("x")}),
               "did you mean chemprot");
  expect_error(run_eval(dir.file("o"), {"--tasks", "hoc,nosuchtask", "--no-db"}), "unknown task");
  expect_error(test::run_cli({"eval", "--model", demo_model(), "--tasks", "hoc", "--data-dir", dir.file("nodata"),
                              "--no-db"}),
               "--data-dir");
  expect_error(run_eval(dir.file("o"), {"--tasks", "chemprot", "--split", "train", "--no-db"}), "no split \"train\"");
  expect_error(run_eval(dir.file("o"), {"--tasks", "chemprot", "--method", "five-shot", "--no-db"}), "unknown method");
  expect_error(run_eval(dir.file("o"), {"--tasks", "chemprot", "--scoring", "best", "--no-db"}), "scoring mode");
  expect_error(test::run_cli({"score", "--task", "hoc", "--data-dir", dd, "--outputs", dir.file("missing.jsonl")}),
               "missing.jsonl");
  test::write_file(dir.file("bad.jsonl"), "{\"id\": \"1311633\", \"output\": \"{}\"}\n{\"id\": 5, \n");
  expect_error(test::run_cli({"score", "--task", "hoc", "--data-dir", dd, "--outputs", dir.file("bad.jsonl")}),
               "bad.jsonl:2");
  test::write_file(dir.file("unknown.jsonl"), "{\"id\": \"999999999\", \"output\": \"{}\"}\n");
  expect_error(test::run_cli({"score", "--task", "hoc", "--data-dir", dd, "--outputs", dir.file("unknown.jsonl")}),
               "id 999999999 is not in hoc split sample200");
  test::write_file(dir.file("dup.jsonl"), "{\"id\": 3, \"output\": \"A\"}\n{\"id\": \"3\", \"output\": \"B\"}\n");
  expect_error(test::run_cli({"score", "--task", "medqa", "--data-dir", dd, "--outputs", dir.file("dup.jsonl")}),
               "appears twice");
  // An eval into a directory that holds another configuration's samples stops before touching them.
  const std::string out = dir.file("kept");
  ASSERT_EQ(run_eval(out, {"--tasks", "medqa", "--limit", "2", "--no-db"}).exit_code, 0);
  const std::string results = test::read_file(out + "/results.json");
  const std::string samples = test::read_file(out + "/samples/medqa.jsonl");
  expect_error(run_eval(out, {"--tasks", "medqa", "--limit", "2", "--method", "cot", "--no-db"}), "another configuration");
  EXPECT_EQ(test::read_file(out + "/results.json"), results);
  EXPECT_EQ(test::read_file(out + "/samples/medqa.jsonl"), samples);
  test::write_file(out + "/results.json", "{ not json");
  expect_error(run_eval(out, {"--tasks", "medqa", "--limit", "2", "--no-db"}), "not JSON");
  EXPECT_EQ(test::read_file(out + "/results.json"), "{ not json");
}

}  // namespace
}  // namespace bioquant::eval
