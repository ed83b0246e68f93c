// `eval`, `score`, `compare-runs` and `tasks`: thin shells over bioquant/eval.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <set>

#include <nlohmann/json.hpp>

#include "bioquant/core/error.h"
#include "bioquant/core/mapped_file.h"
#include "bioquant/eval/backend.h"
#include "bioquant/eval/openai_backend.h"
#include "bioquant/eval/prompts.h"
#include "bioquant/eval/runner.h"
#include "bioquant/eval/scoring.h"
#include "bioquant/eval/stats.h"
#include "bioquant/io/json_lines.h"
#include "bioquant/tokenizer/tokenizer.h"
#include "cli/commands.h"
#include "cli/common.h"

namespace bioquant::cli {

using nlohmann::json;
namespace fs = std::filesystem;
using namespace bioquant::eval;

namespace {

void load_task_files(const std::vector<std::string>& files) {
  for (const auto& f : files) register_task(load_task_file(f));
}

std::string fmt(double v, int digits = 4) {
  if (std::isnan(v)) return "-";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  return buf;
}

// JSON lines {"id": ..., "output": "..."}; ids may be strings or integers.
std::vector<std::pair<std::string, std::string>> read_outputs(const std::string& path) {
  std::vector<std::pair<std::string, std::string>> out;
  std::set<std::string> seen;
  io::for_each_json_line(
      read_text_file(path), path,
      [&](json& j, const std::string& where) {
        check(j.is_object() && j.contains("id") && j.contains("output"), where + ": expected {\"id\": ..., \"output\": \"...\"}");
        std::string id;
        if (j["id"].is_string()) id = j["id"].get<std::string>();
        else if (j["id"].is_number_integer()) id = std::to_string(j["id"].get<int64_t>());
        else throw Error(where + ": \"id\" must be a string or an integer");
        check(j["output"].is_string() || j["output"].is_null(), where + ": \"output\" must be a string");
        check(seen.insert(id).second, where + ": id " + id + " appears twice");
        out.emplace_back(id, j["output"].is_string() ? j["output"].get<std::string>() : "");
      },
      "{\"id\": ..., \"output\": \"...\"}");
  check(!out.empty(), path + ": no outputs");
  return out;
}

void print_summary_table(const std::vector<std::pair<std::string, json>>& tasks) {
  std::printf("%-14s %-10s %-15s %-8s %-19s %-9s %s\n", "task", "split", "metric", "score", "95% CI", "unparsed", "n");
  for (const auto& [name, t] : tasks) {
    const std::string ci = "[" + fmt(t["ci95"][0].get<double>()) + ", " + fmt(t["ci95"][1].get<double>()) + "]";
    std::printf("%-14s %-10s %-15s %-8s %-19s %-9lld %lld\n", name.c_str(), t.value("split", "").c_str(),
                t.value("metric", "").c_str(), fmt(t["score"].get<double>()).c_str(), ci.c_str(),
                static_cast<long long>(t.value("unparsed", 0)), static_cast<long long>(t.value("n", 0)));
  }
}

json read_samples(const std::string& path) {
  check(fs::is_regular_file(path), "no samples file " + path);
  json lines = json::array();
  io::for_each_json_line(read_text_file(path), path, [&](json& j, const std::string& where) {
    check(j.is_object() && j.contains("id") && j["id"].is_string() && j.contains("parsed") && j.contains("gold"),
          where + ": not a BioQuant sample line (id, parsed, gold)");
    lines.push_back(std::move(j));
  });
  return lines;
}

// An eval output directory, or its results.json.
std::pair<std::string, json> read_results(const std::string& where) {
  std::string dir = where, file = where;
  if (fs::is_directory(where)) file = (fs::path(where) / "results.json").string();
  else dir = fs::path(where).parent_path().string();
  check(fs::is_regular_file(file), where + ": no results.json (give an eval --out directory)");
  json j;
  try {
    j = json::parse(read_text_file(file));
  } catch (const json::exception&) {
    throw Error(file + ": not valid JSON");
  }
  check(j.is_object() && j.contains("tasks") && j["tasks"].is_object(), file + ": not a BioQuant results file");
  return {dir.empty() ? "." : dir, j};
}

}  // namespace

Run add_eval(CLI::App& app) {
  auto c = std::make_shared<Common>();
  c->model.clear();
  add_model_flags(app, *c, /*required=*/false);
  struct Flags {
    std::string tasks, data_dir, split, method = "zero-shot", scoring = "generate", style = "bioquant";
    std::string out = "bioquant-eval", db = "bioquant.sqlite", backend = "local", endpoint, api_model;
    std::vector<std::string> task_files;
    int shots = 5, max_new = 0, bootstrap = 1000, batch = 1;
    uint64_t seed = 1234;
    int64_t limit = 0;
    bool no_chat = false, quiet = false, no_db = false;
  };
  auto f = std::make_shared<Flags>();
  app.add_option("--tasks", f->tasks, "comma-separated task names, or all")->required();
  app.add_option("--task-file", f->task_files, "add a task from a JSON description (repeatable)");
  app.add_option("--data-dir", f->data_dir, "benchmark data (default: $BIOQUANT_DATA, else ../shared/bionlp)");
  app.add_option("--split", f->split, "split to evaluate (default: each task's, sample200 where it exists)");
  app.add_option("--method", f->method,
                 "zero-shot (default), few-shot, few-shot-similar (each example's most similar training examples, "
                 "BM25) or cot");
  app.add_option("--shots", f->shots, "few-shot examples (default 5)")->check(CLI::Range(1, 64));
  app.add_option("--seed", f->seed, "seed of the few-shot draw (default 1234; recorded)");
  app.add_option("--scoring", f->scoring, "generate (free text + parser, default), constrained or loglik");
  app.add_option("--prompt-style", f->style, "bioquant (default) or chen2023 (prompt_chen2023.txt from the data)");
  app.add_flag("--no-chat-template", f->no_chat, "send prompts as plain text even if the model has a chat template");
  app.add_option("--limit", f->limit, "evaluate the first N examples of each split (0 = all)")->check(non_negative_number());
  app.add_option("--max-new-tokens", f->max_new, "answer budget (default: per task; cot adds 384)")->check(CLI::Range(0, 8192));
  app.add_option("--batch", f->batch,
                 "examples answered together in generate scoring (default 1): one pass reads the weights for all; "
                 "quantized or on a GPU, answers may differ from --batch 1 at near-ties")
      ->check(CLI::Range(1, 256));
  app.add_option("--out", f->out, "output directory (default bioquant-eval)");
  app.add_option("--db", f->db, "SQLite results database (default bioquant.sqlite)");
  app.add_flag("--no-db", f->no_db, "do not record the run in a database");
  app.add_option("--bootstrap", f->bootstrap, "bootstrap replicates for the 95% CI (default 1000)")->check(CLI::Range(100, 100000));
  app.add_option("--backend", f->backend, "local (default) or openai (an OpenAI-compatible server)");
  app.add_option("--endpoint", f->endpoint, "openai backend: base URL, e.g. http://127.0.0.1:8000/v1");
  app.add_option("--api-model", f->api_model, "openai backend: the server's model name");
  app.add_flag("--quiet", f->quiet, "no progress lines");
  return [=]() {
    load_task_files(f->task_files);
    EvalOptions o;
    o.tasks = select_tasks(f->tasks);
    if (!f->data_dir.empty()) o.data_dir = f->data_dir;
    o.split = f->split;
    o.method = parse_prompt_method(f->method);
    o.shots = f->shots;
    o.seed = f->seed;
    o.scoring = parse_scoring_mode(f->scoring);
    check(f->style == "bioquant" || f->style == "chen2023", "--prompt-style must be bioquant or chen2023");
    o.chen2023 = f->style == "chen2023";
    o.limit = f->limit;
    o.max_new_tokens = f->max_new;
    o.batch = f->batch;
    o.out_dir = f->out;
    o.db_path = f->no_db ? "" : f->db;
    o.score.replicates = f->bootstrap;
    o.progress = !f->quiet;
    o.version = BIOQUANT_VERSION;
    // Resolve data for every task before any model work: a bad directory fails in a second.
    for (const TaskSpec* t : o.tasks) {
      const std::string dir = resolve_data_dir(o.data_dir, *t);
      t->split(o.split.empty() ? t->default_split : o.split);
      (void)dir;
    }
    std::unique_ptr<ThreadPool> pool;
    std::unique_ptr<Model> model;
    std::unique_ptr<Tokenizer> tokenizer;
    std::unique_ptr<Backend> backend;
    if (f->backend == "openai") {
      check(!f->endpoint.empty(), "--backend openai needs --endpoint URL");
      check(c->model.empty() && c->quant.empty(), "--backend openai evaluates the served model: drop --model/--quant");
      OpenAIOptions oa;
      oa.endpoint = f->endpoint;
      oa.model = f->api_model;
      oa.chat = !f->no_chat;
      if (const char* key = std::getenv("OPENAI_API_KEY")) oa.api_key = key;
      backend = std::make_unique<OpenAIBackend>(oa);
      o.chat = oa.chat;
      o.model = f->api_model.empty() ? f->endpoint : f->api_model;
      o.model_hash = "";
      o.backend = "openai " + f->endpoint;
      o.device = "remote";
    } else {
      check(f->backend == "local", "--backend must be local or openai");
      check(!c->model.empty(), "give --model PATH (or --backend openai --endpoint URL)");
      check(f->endpoint.empty() && f->api_model.empty(), "--endpoint/--api-model need --backend openai");
      const int device = check_device(*c);
      pool = std::make_unique<ThreadPool>(c->threads);
      o.model_hash = model_fingerprint(c->model);
      model = open_model(*c, *pool);
      tokenizer = load_tokenizer(c->model);
      auto local = std::make_unique<LocalBackend>(*model, *tokenizer, *pool, !f->no_chat, device, apply_gpu_flags(*c, device), c->exact);
      o.chat = local->applies_chat_template();
      backend = std::move(local);
      o.model = c->model;
      o.backend = "local";
      o.device = c->device;
      o.exact = c->exact;
      o.threads = static_cast<int>(pool->size());
      o.weight_bytes = static_cast<int64_t>(model->weight_bytes());
    }
    o.quant = c->quant.empty() ? "none" : c->quant + (c->double_quant ? "+dq" : "");
    const json results = run_eval(o, *backend);
    if (const auto* local = dynamic_cast<const LocalBackend*>(backend.get())) report_gpu_memory(local->decoder());
    std::vector<std::pair<std::string, json>> ran;
    for (const TaskSpec* t : o.tasks) ran.emplace_back(t->name, results["tasks"][t->name]);
    print_summary_table(ran);
    std::fprintf(stderr, "results: %s/results.json, samples: %s/samples/%s\n", o.out_dir.c_str(), o.out_dir.c_str(),
                 o.db_path.empty() ? "" : (", run recorded in " + o.db_path).c_str());
    report_peak_memory();
    return 0;
  };
}

Run add_score(CLI::App& app) {
  struct Flags {
    std::string task, data_dir, split, outputs, method = "zero-shot";
    std::vector<std::string> task_files;
    bool json_out = false;
    int bootstrap = 1000;
    uint64_t seed = 1234;
  };
  auto f = std::make_shared<Flags>();
  app.add_option("--task", f->task, "task name")->required();
  app.add_option("--task-file", f->task_files, "add a task from a JSON description (repeatable)");
  app.add_option("--data-dir", f->data_dir, "benchmark data (default: $BIOQUANT_DATA, else ../shared/bionlp)");
  app.add_option("--split", f->split, "split the outputs answer (default: the task's)");
  app.add_option("--outputs", f->outputs, "JSON lines {\"id\": ..., \"output\": \"raw text\"}")->required();
  app.add_option("--method", f->method, "cot: parse the final answer line of chain-of-thought outputs");
  app.add_option("--bootstrap", f->bootstrap, "bootstrap replicates (default 1000)")->check(CLI::Range(100, 100000));
  app.add_option("--seed", f->seed, "bootstrap seed (default 1234)");
  app.add_flag("--json", f->json_out, "print one JSON object");
  return [=]() {
    load_task_files(f->task_files);
    const TaskSpec& task = find_task(f->task);
    const bool cot = parse_prompt_method(f->method) == PromptMethod::cot;
    const std::string dir = resolve_data_dir(f->data_dir.empty() ? std::nullopt : std::optional(f->data_dir), task);
    const std::string split = f->split.empty() ? task.default_split : f->split;
    const std::vector<Example> examples = read_split(task, dir, split);
    std::map<std::string, const Example*> by_id;
    for (const auto& ex : examples) by_id[ex.id] = &ex;
    const auto outputs = read_outputs(f->outputs);
    std::vector<Example> scored;
    std::vector<Gold> gold;
    std::vector<Prediction> preds;
    for (const auto& [id, output] : outputs) {
      auto it = by_id.find(id);
      check(it != by_id.end(), f->outputs + ": id " + id + " is not in " + task.name + " split " + split);
      scored.push_back(*it->second);
      gold.push_back(it->second->gold);
      preds.push_back(parse_example_output(task, *it->second, output, cot));
    }
    ScoreOptions so;
    so.replicates = f->bootstrap;
    so.seed = f->seed;
    json summary = score_summary(task, split, metric_labels(task, scored), gold, preds, so);
    summary["examples_in_split"] = examples.size();
    if (f->json_out) {
      std::printf("%s\n", summary.dump().c_str());
    } else {
      print_summary_table({{task.name, summary}});
      if (summary.contains("precision") && task.family == TaskFamily::ner)
        std::printf("precision %s  recall %s  (tp %lld, predicted %lld, gold %lld)\n",
                    fmt(summary["precision"].get<double>()).c_str(), fmt(summary["recall"].get<double>()).c_str(),
                    static_cast<long long>(summary["tp"].get<int64_t>()),
                    static_cast<long long>(summary["predicted"].get<int64_t>()),
                    static_cast<long long>(summary["gold"].get<int64_t>()));
      for (const auto& pc : summary["per_class"])
        std::printf("  %-40s P %s  R %s  F1 %s  support %lld\n", pc["label"].get<std::string>().c_str(),
                    fmt(pc["precision"].get<double>()).c_str(), fmt(pc["recall"].get<double>()).c_str(),
                    fmt(pc["f1"].get<double>()).c_str(), static_cast<long long>(pc["support"].get<int64_t>()));
      if (outputs.size() < examples.size())
        std::fprintf(stderr, "note: %zu of the split's %zu examples scored\n", outputs.size(), examples.size());
    }
    return 0;
  };
}

Run add_compare_runs(CLI::App& app) {
  struct Flags {
    std::string a, b, tasks;
    bool json_out = false;
    int bootstrap = 1000;
    uint64_t seed = 1234;
    int show = 5;
  };
  auto f = std::make_shared<Flags>();
  app.add_option("A", f->a, "eval output directory of the baseline run (e.g. the 16-bit model)")->required();
  app.add_option("B", f->b, "eval output directory of the compared run (e.g. its 4-bit version)")->required();
  app.add_option("--tasks", f->tasks, "only these tasks (default: every task both runs have)");
  app.add_option("--bootstrap", f->bootstrap, "paired bootstrap replicates (default 1000)")->check(CLI::Range(100, 100000));
  app.add_option("--seed", f->seed, "bootstrap seed (default 1234)");
  app.add_option("--show-flips", f->show, "flipped example ids to list per direction (default 5)")->check(non_negative_number());
  app.add_flag("--json", f->json_out, "print one JSON object");
  return [=]() {
    const auto [dir_a, res_a] = read_results(f->a);
    const auto [dir_b, res_b] = read_results(f->b);
    std::set<std::string> wanted;
    if (!f->tasks.empty())
      for (const TaskSpec* t : select_tasks(f->tasks)) wanted.insert(t->name);
    json out = {{"a", f->a}, {"b", f->b}, {"tasks", json::object()}};
    std::vector<PairedTask> paired;  // for the change in mean score over the tasks
    for (const auto& [name, ta] : res_a["tasks"].items()) {
      if (!wanted.empty() && !wanted.count(name)) continue;
      if (!res_b["tasks"].contains(name)) continue;
      const json& tb = res_b["tasks"][name];
      check(ta.value("metric", "") == tb.value("metric", ""), name + ": the two runs use different metrics");
      check(ta.value("split", "") == tb.value("split", ""), name + ": the two runs evaluated different splits (" +
                                                                ta.value("split", "") + " vs " + tb.value("split", "") + ")");
      const json sa = read_samples((fs::path(dir_a) / "samples" / (name + ".jsonl")).string());
      const json sb = read_samples((fs::path(dir_b) / "samples" / (name + ".jsonl")).string());
      std::map<std::string, const json*> in_b;
      for (const auto& l : sb) in_b[l["id"].get<std::string>()] = &l;
      std::vector<Gold> gold;
      std::vector<Prediction> pa, pb;
      std::vector<std::string> ids;
      for (const auto& l : sa) {
        auto it = in_b.find(l["id"].get<std::string>());
        if (it == in_b.end()) continue;
        check(l["gold"] == (*it->second)["gold"], name + ": example " + l["id"].get<std::string>() +
                                                      " has different gold answers in the two runs");
        ids.push_back(l["id"].get<std::string>());
        gold.push_back(gold_from_json(l["gold"]));
        pa.push_back(prediction_from_json(l["parsed"]));
        pb.push_back(prediction_from_json((*it->second)["parsed"]));
      }
      check(!ids.empty(), name + ": the two runs share no examples");
      std::vector<std::string> labels;
      for (const auto& l : ta.value("labels", json::array())) labels.push_back(l.get<std::string>());
      const MetricKind kind = parse_metric_kind(ta["metric"].get<std::string>());
      const PairedComparison p = compare_paired(kind, labels, gold, pa, pb, f->bootstrap, f->seed);
      paired.push_back({kind, labels, gold, pa, pb});
      json r2w = json::array(), w2r = json::array();
      for (size_t i : p.right_to_wrong_indices) r2w.push_back(ids[i]);
      for (size_t i : p.wrong_to_right_indices) w2r.push_back(ids[i]);
      out["tasks"][name] = {{"metric", ta["metric"]}, {"n", p.n}, {"shared_examples", ids.size()},
                            {"examples_a", sa.size()}, {"examples_b", sb.size()},
                            {"score_a", p.score_a}, {"score_b", p.score_b}, {"diff", p.diff},
                            {"ci95", {p.ci.low, p.ci.high}}, {"p_value", p.p_value},
                            {"both_right", p.both_right}, {"both_wrong", p.both_wrong},
                            {"right_to_wrong", p.right_to_wrong}, {"wrong_to_right", p.wrong_to_right},
                            {"right_to_wrong_ids", r2w}, {"wrong_to_right_ids", w2r}};
    }
    check(!out["tasks"].empty(), "the two runs have no task in common" + std::string(f->tasks.empty() ? "" : " among --tasks"));
    out["bootstrap"] = {{"replicates", f->bootstrap}, {"seed", f->seed}};
    if (paired.size() > 1) {  // the tasks in name order, task k resampled from seed + k
      const MeanDifference m = compare_paired_mean(paired, f->bootstrap, f->seed);
      double mean_a = 0, mean_b = 0;
      for (const auto& [name, t] : out["tasks"].items()) {
        mean_a += t["score_a"].get<double>();
        mean_b += t["score_b"].get<double>();
      }
      const double count = static_cast<double>(paired.size());
      out["mean"] = {{"tasks", paired.size()}, {"score_a", mean_a / count}, {"score_b", mean_b / count},
                     {"diff", m.diff}, {"ci95", {m.ci.low, m.ci.high}}, {"p_value", m.p_value}, {"n", m.n}};
    }
    if (f->json_out) {
      std::printf("%s\n", out.dump().c_str());
      return 0;
    }
    std::printf("%-14s %-8s %-8s %-9s %-21s %-7s %-10s %-10s %s\n", "task", "A", "B", "B-A", "95% CI (paired)", "p",
                "right>wrong", "wrong>right", "n");
    for (const auto& [name, t] : out["tasks"].items()) {
      const std::string ci = "[" + fmt(t["ci95"][0].get<double>()) + ", " + fmt(t["ci95"][1].get<double>()) + "]";
      std::printf("%-14s %-8s %-8s %-9s %-21s %-7s %-11lld %-11lld %lld\n", name.c_str(),
                  fmt(t["score_a"].get<double>()).c_str(), fmt(t["score_b"].get<double>()).c_str(),
                  fmt(t["diff"].get<double>()).c_str(), ci.c_str(), fmt(t["p_value"].get<double>(), 3).c_str(),
                  static_cast<long long>(t["right_to_wrong"].get<int64_t>()),
                  static_cast<long long>(t["wrong_to_right"].get<int64_t>()),
                  static_cast<long long>(t["n"].get<int64_t>()));
      auto list = [&](const char* what, const json& v) {
        if (v.empty() || f->show == 0) return;
        std::string s;
        for (size_t i = 0; i < v.size() && i < static_cast<size_t>(f->show); ++i) {
          if (i) s.append(", ");
          s.append(v[i].get<std::string>());
        }
        if (v.size() > static_cast<size_t>(f->show)) s += ", ...";
        std::printf("    %s: %s\n", what, s.c_str());
      };
      list("right>wrong", t["right_to_wrong_ids"]);
      list("wrong>right", t["wrong_to_right_ids"]);
    }
    if (out.contains("mean")) {
      const json& m = out["mean"];
      const std::string ci = "[" + fmt(m["ci95"][0].get<double>()) + ", " + fmt(m["ci95"][1].get<double>()) + "]";
      const std::string label = "mean of " + std::to_string(m["tasks"].get<size_t>());
      std::printf("%-14s %-8s %-8s %-9s %-21s %-7s %-11s %-11s %lld\n", label.c_str(),
                  fmt(m["score_a"].get<double>()).c_str(), fmt(m["score_b"].get<double>()).c_str(),
                  fmt(m["diff"].get<double>()).c_str(), ci.c_str(), fmt(m["p_value"].get<double>(), 3).c_str(), "", "",
                  static_cast<long long>(m["n"].get<int64_t>()));
    }
    return 0;
  };
}

// Prompts (and gold answers) exactly as eval renders and tokenizes them: for inspection, and as the
// training data of the demo model (tools/train_demo_model.py).
Run add_prompts(CLI::App& app) {
  struct Flags {
    std::string task, data_dir, split, method = "zero-shot", model;
    std::vector<std::string> task_files;
    int shots = 5;
    uint64_t seed = 1234;
    int64_t limit = 0;
    bool answers = false, exclude_evaluated = false, ids = false, no_chat = false;
  };
  auto f = std::make_shared<Flags>();
  app.add_option("--task", f->task, "task name")->required();
  app.add_option("--task-file", f->task_files, "add a task from a JSON description (repeatable)");
  app.add_option("--data-dir", f->data_dir, "benchmark data (default: $BIOQUANT_DATA, else ../shared/bionlp)");
  app.add_option("--split", f->split, "split (default: the task's)");
  app.add_option("--method", f->method,
                 "zero-shot (default), few-shot, few-shot-similar (each example's most similar training examples, "
                 "BM25) or cot");
  app.add_option("--shots", f->shots, "few-shot examples (default 5)")->check(CLI::Range(1, 64));
  app.add_option("--seed", f->seed, "seed of the few-shot draw (default 1234)");
  app.add_option("--limit", f->limit, "first N examples (0 = all)")->check(non_negative_number());
  app.add_option("--model", f->model, "model whose tokenizer and chat template to apply (needed for --ids)");
  app.add_flag("--no-chat-template", f->no_chat, "do not apply the model's chat template");
  app.add_flag("--answers", f->answers, "add the gold answer in the study's output format");
  app.add_flag("--ids", f->ids, "add prompt_ids (and answer_ids + EOS) as eval feeds them to the model");
  app.add_flag("--exclude-evaluated", f->exclude_evaluated,
               "drop examples whose input also occurs in an evaluated split (sample200, test*, the default)");
  return [=]() {
    load_task_files(f->task_files);
    const TaskSpec& task = find_task(f->task);
    const std::string dir = resolve_data_dir(f->data_dir.empty() ? std::nullopt : std::optional(f->data_dir), task);
    const std::string split = f->split.empty() ? task.default_split : f->split;
    std::vector<Example> examples = read_split(task, dir, split);
    std::set<std::string> evaluated_ids, evaluated_keys;
    if (f->exclude_evaluated) {
      const auto splits = evaluated_splits(task);
      check(std::find(splits.begin(), splits.end(), split) == splits.end(),
            "--exclude-evaluated: split " + split + " is itself evaluated");
      for (const auto& s : splits)
        for (const auto& ex : read_split(task, dir, s)) {
          evaluated_ids.insert(ex.id);
          evaluated_keys.insert(example_key(ex));
        }
    }
    PromptOptions po;
    po.method = parse_prompt_method(f->method);
    FewShots shots;
    if (uses_shots(po.method)) {
      const std::string fs_split = task.split(split).fewshot;
      check(!fs_split.empty(), "task " + task.name + " names no few-shot split");
      // The same choice as eval: never an example of the evaluated split (by id within it, by input across files).
      const std::vector<Example> pool = read_split(task, dir, fs_split);
      shots = FewShots(task, po.method, f->shots, f->seed, pool, fewshot_exclusions(examples, pool, fs_split == split));
    }
    std::unique_ptr<Tokenizer> tok;
    if (!f->model.empty()) tok = load_tokenizer(f->model);
    check(!f->ids || tok, "--ids needs --model PATH (its tokenizer)");
    po.chat = tok && !f->no_chat && !tok->chat_template().empty();
    int64_t written = 0, dropped = 0;
    for (const auto& ex : examples) {
      if (f->limit > 0 && written >= f->limit) break;
      // Ids identify examples across splits only where the file has its own (positions do not).
      const bool own_ids = !task.column("id").empty();
      if (f->exclude_evaluated && (evaluated_keys.count(example_key(ex)) || (own_ids && evaluated_ids.count(ex.id)))) {
        ++dropped;
        continue;
      }
      const std::vector<Example> shown = shots.for_example(ex);
      json line = {{"task", task.name}, {"split", split}, {"id", ex.id}, {"prompt", build_prompt(task, po, shown, ex)}};
      if (shots.per_example()) {
        line["shots"] = json::array();
        for (const Example& s : shown) line["shots"].push_back(s.id);
      }
      if (f->answers || f->ids) line["answer"] = render_gold_answer(task, ex);
      if (f->ids) {
        line["prompt_ids"] = encode_prompt_text(*tok, line["prompt"].get<std::string>(), po.chat);
        std::vector<int32_t> answer = tok->encode(line["answer"].get<std::string>(), false, false);
        check(tok->eos_id().has_value(), f->model + ": the tokenizer has no EOS token");
        answer.push_back(*tok->eos_id());
        line["answer_ids"] = answer;
      }
      std::printf("%s\n", line.dump().c_str());
      ++written;
    }
    if (f->exclude_evaluated)
      std::fprintf(stderr, "%s/%s: %lld examples, %lld dropped (input also in an evaluated split)\n", task.name.c_str(),
                   split.c_str(), static_cast<long long>(written), static_cast<long long>(dropped));
    return 0;
  };
}

Run add_tasks(CLI::App& app) {
  auto files = std::make_shared<std::vector<std::string>>();
  auto as_json = std::make_shared<bool>(false);
  app.add_option("--task-file", *files, "add a task from a JSON description (repeatable)");
  app.add_flag("--json", *as_json, "print JSON");
  return [=]() {
    load_task_files(*files);
    json out = json::array();
    for (const auto& t : all_tasks()) {
      json splits = json::array();
      for (const auto& s : t.splits) splits.push_back(s.name);
      out.push_back({{"name", t.name}, {"family", family_name(t.family)}, {"dataset", t.dataset},
                     {"metric", t.metric}, {"splits", splits}, {"default_split", t.default_split},
                     {"labels", t.labels}, {"source", t.source}});
    }
    if (*as_json) {
      std::printf("%s\n", out.dump().c_str());
      return 0;
    }
    for (const auto& t : out) {
      std::string splits;
      for (const auto& s : t["splits"]) {
        if (!splits.empty()) splits.append(",");
        splits.append(s.get<std::string>());
      }
      std::printf("%-14s %-11s %-15s %-22s splits %s (default %s)\n", t["name"].get<std::string>().c_str(),
                  t["family"].get<std::string>().c_str(), t["metric"].get<std::string>().c_str(),
                  t["dataset"].get<std::string>().c_str(), splits.c_str(),
                  t["default_split"].get<std::string>().c_str());
    }
    return 0;
  };
}

static const CommandRegistration register_prompts(75, "prompts", "Print prompts (and gold answers / token ids) exactly as eval renders them", add_prompts);

}  // namespace bioquant::cli
