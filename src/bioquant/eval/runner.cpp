#include "bioquant/eval/runner.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>

#include "bioquant/core/atomic_file.h"
#include "bioquant/core/error.h"
#include "bioquant/core/hash.h"
#include "bioquant/core/mapped_file.h"
#include "bioquant/core/memory.h"
#include "bioquant/core/progress.h"
#include "bioquant/eval/store.h"

namespace bioquant::eval {

namespace fs = std::filesystem;
using nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

std::string utc_now() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

struct SampleLine {
  json line;
  std::string id;
};

// Valid sample lines of this configuration already on disk, by id. A line cut short by an
// interrupted run is skipped (its example is recomputed).
std::map<std::string, json> load_finished(const std::string& path, const std::string& config_hash,
                                          const std::set<std::string>& ids) {
  std::map<std::string, json> done;
  if (!fs::exists(path)) return done;
  std::ifstream in(path);
  std::string text;
  size_t other = 0;
  while (std::getline(in, text)) {
    json j;
    try {
      j = json::parse(text);
    } catch (const json::exception&) {
      continue;
    }
    if (!j.is_object() || !j.contains("id") || !j["id"].is_string()) continue;
    if (j.value("config_hash", "") != config_hash) {
      ++other;
      continue;
    }
    const std::string id = j["id"].get<std::string>();
    if (ids.count(id)) done[id] = std::move(j);
  }
  check(other == 0, path + " holds " + std::to_string(other) +
                        " results of another configuration; use another --out directory (or remove the file)");
  return done;
}

void write_samples(const std::string& path, const std::vector<const json*>& lines) {
  write_file_atomically(path, [&](std::ostream& out) {
    for (const json* l : lines) out << l->dump() << '\n';
  });
}

std::string read_chen2023(const std::string& data_dir, const TaskSpec& task) {
  const fs::path p = fs::path(data_dir) / task.data_dir / "prompt_chen2023.txt";
  if (!fs::is_regular_file(p)) return "";
  std::string text = read_text_file(p.string());
  if (text.rfind("\xEF\xBB\xBF", 0) == 0) text.erase(0, 3);  // UTF-8 BOM (HoC's file has one)
  return text;
}

json task_config(const EvalOptions& o, const TaskSpec& task, const std::string& split, const std::string& style,
                 int max_new_tokens, const std::vector<Example>& shots) {
  std::vector<std::string> shot_ids;
  for (const auto& s : shots) shot_ids.push_back(s.id);
  // Everything that changes an example's prompt or output; --limit is left out so a larger limit
  // resumes a smaller run.
  return {{"task", task.name},
          {"task_description", {{"instruction", task.instruction}, {"input_template", task.input_template},
                                {"output_prefix", task.output_prefix}, {"labels", task.labels},
                                {"metric", task.metric}}},
          {"split", split},
          {"method", prompt_method_name(o.method)},
          {"shots", uses_shots(o.method) ? o.shots : 0},
          {"fewshot_seed", o.seed},
          {"fewshot_ids", shot_ids},
          {"scoring", scoring_mode_name(o.scoring)},
          {"prompt_style", style},
          {"chat_template", o.chat},
          {"max_new_tokens", max_new_tokens},
          {"model_hash", o.model_hash},
          {"quant", o.quant},
          {"backend", o.backend}};
}

std::string cut_at_answer_marker(const std::string& reasoning) {
  std::string lower = reasoning;
  for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  const size_t at = lower.find("answer:");
  std::string out = at == std::string::npos ? reasoning : reasoning.substr(0, at);
  while (!out.empty() && (out.back() == ' ' || out.back() == '\n')) out.pop_back();
  return out;
}

}  // namespace

FewShots::FewShots(const TaskSpec& task, PromptMethod method, int k, uint64_t seed, const std::vector<Example>& pool,
                   std::set<std::string> exclude)
    : task_(&task), k_(k), exclude_(std::move(exclude)) {
  if (method == PromptMethod::few_shot) {
    drawn_ = choose_fewshot(pool, k, seed, exclude_);
  } else if (method == PromptMethod::few_shot_similar) {
    std::vector<std::string> texts;
    for (const Example& ex : pool) texts.push_back(render_input(task, ex, false));
    similar_ = std::make_shared<const SimilarShots>(pool, texts);
    similar_->choose("", k, exclude_);  // enough examples to choose from: said before any is evaluated
  }
}

std::vector<Example> FewShots::for_example(const Example& ex) const {
  if (!similar_) return drawn_;
  return similar_->choose(render_input(*task_, ex, false), k_, exclude_);
}

std::set<std::string> fewshot_exclusions(const std::vector<Example>& evaluated, const std::vector<Example>& pool,
                                         bool pool_is_evaluated_split) {
  std::set<std::string> out;
  if (pool_is_evaluated_split) {
    for (const auto& ex : evaluated) out.insert(ex.id);
    return out;
  }
  std::set<std::string> keys;
  for (const auto& ex : evaluated) keys.insert(example_key(ex));
  for (const auto& ex : pool)
    if (keys.count(example_key(ex))) out.insert(ex.id);
  return out;
}

std::vector<AnswerSegment> answer_plan(const TaskSpec& task, const Example& ex) {
  switch (task.family) {
    case TaskFamily::ner: return {};
    case TaskFamily::relation: return {AnswerSegment{"", task.labels}};
    case TaskFamily::qa: return {AnswerSegment{"", ex.option_letters.empty() ? task.labels : ex.option_letters}};
    case TaskFamily::multilabel: {
      // The study's JSON, one decision per label (render_multilabel_json's layout).
      std::vector<AnswerSegment> plan;
      for (size_t i = 0; i < task.labels.size(); ++i) {
        plan.push_back({(i == 0 ? "{\n  \"" : ",\n  \"") + task.labels[i] + "\": ", {}});
        plan.push_back({"", {"0", "1"}});
      }
      plan.push_back({"\n}", {}});
      return plan;
    }
  }
  return {};
}

std::string model_fingerprint(const std::string& path) {
  std::string material;
  auto add_file = [&](const fs::path& p) {
    const auto size = fs::file_size(p);
    material += p.filename().string() + ":" + std::to_string(size) + ":";
    std::ifstream in(p, std::ios::binary);
    const size_t mib = 1 << 20;
    std::string head(std::min<size_t>(size, mib), '\0');
    in.read(head.data(), static_cast<std::streamsize>(head.size()));
    material += sha256_hex(head);
    if (size > mib) {
      std::string tail(std::min<size_t>(size - mib, mib), '\0');
      in.seekg(static_cast<std::streamoff>(size - tail.size()));
      in.read(tail.data(), static_cast<std::streamsize>(tail.size()));
      material += sha256_hex(tail);
    }
    material += '\n';
  };
  check(fs::exists(path), path + ": no such model file or directory");
  if (fs::is_directory(path)) {
    std::vector<fs::path> files;
    for (const auto& e : fs::directory_iterator(path))
      if (e.is_regular_file()) files.push_back(e.path());
    std::sort(files.begin(), files.end());
    for (const auto& f : files) {
      const std::string ext = f.extension().string();
      if (ext == ".json" || ext == ".safetensors" || ext == ".model" || ext == ".gguf" || ext == ".bpe" ||
          ext == ".txt" || ext == ".tiktoken")
        add_file(f);
    }
  } else {
    add_file(path);
  }
  return sha256_hex(material).substr(0, 16);
}

json run_eval(const EvalOptions& o, Backend& backend) {
  check(!o.tasks.empty(), "no tasks to evaluate");
  check(!uses_shots(o.method) || o.shots >= 1,
        std::string("--method ") + prompt_method_name(o.method) + " needs --shots >= 1");
  check(o.limit >= 0, "--limit must be >= 0");
  fs::create_directories(fs::path(o.out_dir) / "samples");
  const std::string results_path = (fs::path(o.out_dir) / "results.json").string();
  json results = json::object();
  if (fs::exists(results_path)) {
    try {
      results = json::parse(read_text_file(results_path));
    } catch (const json::exception&) {
      throw Error(results_path + " exists but is not JSON; use another --out directory");
    }
    check(results.is_object(), results_path + " is not a BioQuant results file");
  }
  const std::string run_id = utc_now() + "-" + std::to_string(::getpid());
  results["bioquant_version"] = o.version;
  results["model"] = o.model;
  results["model_hash"] = o.model_hash;
  results["quant"] = o.quant;
  results["backend"] = o.backend;
  results["device"] = o.device;
  results["numerics"] = o.exact ? "exact" : "default";
  results["threads"] = o.threads;
  results["weight_bytes"] = o.weight_bytes;
  if (!results.contains("tasks") || !results["tasks"].is_object()) results["tasks"] = json::object();

  for (const TaskSpec* task_ptr : o.tasks) {
    const TaskSpec& task = *task_ptr;
    const std::string data_dir = resolve_data_dir(o.data_dir, task);
    const std::string split = o.split.empty() ? task.default_split : o.split;
    std::vector<Example> examples = read_split(task, data_dir, split);
    // Few-shot examples never come from the evaluated split (LitCovid draws them from test rows
    // outside sample200), whatever --limit is, so a larger limit resumes with the same shots.
    std::set<std::string> split_ids;
    for (const auto& ex : examples) split_ids.insert(ex.id);
    if (o.limit > 0 && static_cast<size_t>(o.limit) < examples.size()) examples.resize(static_cast<size_t>(o.limit));
    std::set<std::string> ids;
    for (const auto& ex : examples) ids.insert(ex.id);

    PromptOptions prompt;
    prompt.method = o.method;
    prompt.chat = o.chat;
    std::string style = "bioquant";
    if (o.chen2023) {
      prompt.chen2023_text = read_chen2023(data_dir, task);
      if (prompt.chen2023_text.empty()) {
        std::fprintf(stderr, "note: %s has no prompt_chen2023.txt in %s; using BioQuant's prompt\n", task.name.c_str(),
                     (fs::path(data_dir) / task.data_dir).c_str());
        style = "bioquant (no prompt_chen2023.txt)";
      } else {
        prompt.chen2023 = true;
        style = "chen2023";
      }
    }
    FewShots shots;
    if (uses_shots(o.method)) {
      const std::string fewshot_split = task.split(split).fewshot;
      check(!fewshot_split.empty(), "task " + task.name + " names no split to draw few-shot examples from");
      const std::vector<Example> pool =
          fewshot_split == split ? read_split(task, data_dir, split) : read_split(task, data_dir, fewshot_split);
      std::set<std::string> exclude =
          fewshot_split == split ? split_ids
                                 : fewshot_exclusions(read_split(task, data_dir, split), pool, /*same split*/ false);
      shots = FewShots(task, o.method, o.shots, o.seed, pool, std::move(exclude));
    }
    const bool cot = o.method == PromptMethod::cot;
    int max_new = o.max_new_tokens > 0 ? o.max_new_tokens : task.max_new_tokens + (cot ? 384 : 0);
    ScoringMode scoring = o.scoring;
    std::string scoring_note;
    if (scoring != ScoringMode::generate && task.family == TaskFamily::ner) {
      scoring = ScoringMode::generate;  // no closed answer set to choose from: free text + parser
      scoring_note = "ner output is free text; scored in generate mode";
    }
    if (scoring != ScoringMode::generate) check(backend.can_choose(), backend.describe() + " only generates text; --scoring " +
                                                                          scoring_mode_name(scoring) + " needs a local model (--model)");
    json config = task_config(o, task, split, style, max_new, shots.drawn());
    // Absent for the other methods, so earlier runs' hashes stay valid.
    if (shots.per_example()) config["shot_selection"] = SimilarShots::kDescription;
    if (o.exact) config["numerics"] = "exact";  // absent by default: earlier runs' hashes stay valid
    const std::string config_hash = sha256_hex(config.dump()).substr(0, 16);

    const std::string samples_path = (fs::path(o.out_dir) / "samples" / (task.name + ".jsonl")).string();
    std::map<std::string, json> done = load_finished(samples_path, config_hash, ids);
    const size_t resumed = done.size();
    {  // rewrite what is kept cleanly before appending (drops a half-written last line)
      std::vector<const json*> keep;
      for (const auto& ex : examples)
        if (done.count(ex.id)) keep.push_back(&done[ex.id]);
      write_samples(samples_path, keep);
    }
    if (resumed && o.progress)
      std::fprintf(stderr, "[%s] resuming: %zu of %zu examples already done\n", task.name.c_str(), resumed, examples.size());

    const BackendCounters before = backend.counters();
    const auto t0 = Clock::now();
    ProgressLine progress(o.progress, task.name, "examples", "ex/s", examples.size(), resumed);
    // Tokens generated (or scored) a second since the task started: the speed an LLM user watches.
    const auto generation_rate = [&]() -> std::string {
      const double s = std::chrono::duration<double>(Clock::now() - t0).count();
      const int64_t tokens = backend.counters().generated_tokens - before.generated_tokens;
      if (s <= 0 || tokens <= 0) return "";
      char buf[48];
      std::snprintf(buf, sizeof buf, "  gen %.1f tok/s", static_cast<double>(tokens) / s);
      return buf;
    };
    int64_t unparsed = 0;
    for (const auto& [id, line] : done)
      if (!line["parsed"].value("parsed", false)) ++unparsed;
    {
      std::ofstream append(samples_path, std::ios::app | std::ios::binary);
      check(static_cast<bool>(append), samples_path + ": cannot open for writing");
      size_t count = resumed;
      std::vector<const Example*> todo;
      for (const auto& ex : examples)
        if (!done.count(ex.id)) todo.push_back(&ex);
      // Free text is generated `batch` examples at a time; each answer is still written (and
      // flushed) in the examples' order, so an interrupted run resumes where it stopped.
      const size_t group = scoring == ScoringMode::generate ? static_cast<size_t>(std::max(o.batch, 1)) : 1;
      std::vector<std::string> texts, outputs;
      std::vector<std::vector<Example>> shown;  // each text's few-shot examples
      for (size_t next = 0; next < todo.size(); ++next) {
        const Example& ex = *todo[next];
        const size_t slot = next % group;
        if (slot == 0) {
          const size_t end = std::min(todo.size(), next + group);
          texts.clear();
          shown.clear();
          for (size_t i = next; i < end; ++i) {
            shown.push_back(shots.for_example(*todo[i]));
            texts.push_back(build_prompt(task, prompt, shown.back(), *todo[i]));
          }
          if (scoring == ScoringMode::generate) {
            outputs = backend.generate_batch(texts, max_new);
            check(outputs.size() == texts.size(), "internal: the backend answered " + std::to_string(outputs.size()) +
                                                      " of " + std::to_string(texts.size()) + " prompts");
          }
        }
        const std::string& text = texts[slot];
        std::string output;
        if (scoring == ScoringMode::generate) {
          output = outputs.at(slot);
        } else {
          std::vector<AnswerSegment> plan = answer_plan(task, ex);
          if (cot) {  // reason freely, then choose the answer after an "Answer:" line
            const std::string reasoning = cut_at_answer_marker(backend.generate(text, max_new));
            plan.insert(plan.begin(), AnswerSegment{reasoning + "\nAnswer: ", {}});
          }
          output = backend.choose(text, plan, scoring);
        }
        const Prediction pred = parse_example_output(task, ex, output, cot);
        const MetricKind kind = parse_metric_kind(task.metric);
        const bool correct = per_example_correct(kind, {ex.gold}, {pred}).front();
        json line = {{"id", ex.id},
                     {"prompt", text},
                     {"output", output},
                     {"parsed", prediction_to_json(task, ex, pred)},
                     {"gold", gold_to_json(task, ex)},
                     {"correct", correct},
                     {"config_hash", config_hash}};
        if (shots.per_example()) {  // which examples this one was shown
          json ids = json::array();
          for (const Example& s : shown[slot]) ids.push_back(s.id);
          line["shots"] = std::move(ids);
        }
        if (!pred.parsed) ++unparsed;
        append << line.dump() << '\n';
        append.flush();
        check(static_cast<bool>(append), samples_path + ": write failed (disk full?)");
        done[ex.id] = std::move(line);
        progress.update(++count, "unparsed " + std::to_string(unparsed) + generation_rate());
      }
    }
    progress.update(examples.size(), "unparsed " + std::to_string(unparsed) + generation_rate(), true);
    const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();

    std::vector<const json*> ordered;
    std::vector<Gold> gold;
    std::vector<Prediction> preds;
    for (const auto& ex : examples) {
      const json& line = done.at(ex.id);
      ordered.push_back(&line);
      gold.push_back(ex.gold);
      preds.push_back(prediction_from_json(line["parsed"]));
    }
    write_samples(samples_path, ordered);
    json summary = score_summary(task, split, metric_labels(task, examples), gold, preds, o.score);
    const BackendCounters& after = backend.counters();
    const int64_t computed = after.prompt_tokens_computed - before.prompt_tokens_computed;
    const int64_t reused = after.prompt_tokens_reused - before.prompt_tokens_reused;
    const int64_t generated = after.generated_tokens - before.generated_tokens;
    const size_t fresh = examples.size() - resumed;
    summary["method"] = prompt_method_name(o.method);
    summary["shots"] = uses_shots(o.method) ? o.shots : 0;
    summary["fewshot_seed"] = o.seed;
    summary["fewshot_ids"] = config["fewshot_ids"];
    summary["scoring"] = scoring_mode_name(scoring);
    if (!scoring_note.empty()) summary["scoring_note"] = scoring_note;
    summary["prompt_style"] = style;
    summary["chat_template"] = o.chat;
    summary["max_new_tokens"] = max_new;
    summary["batch"] = scoring == ScoringMode::generate ? std::max(o.batch, 1) : 1;
    summary["config_hash"] = config_hash;
    summary["resumed_examples"] = resumed;
    summary["prompt_tokens_computed"] = computed;
    summary["prompt_tokens_reused"] = reused;
    summary["generated_tokens"] = generated;
    summary["seconds"] = seconds;
    summary["examples_per_second"] = seconds > 0 ? static_cast<double>(fresh) / seconds : 0.0;
    summary["data_dir"] = data_dir;
    summary["samples"] = samples_path;
    results["tasks"][task.name] = summary;
    results["peak_rss_bytes"] = peak_rss_bytes();
    if (backend.gpu_peak_bytes() > 0) results["gpu_peak_allocated_bytes"] = backend.gpu_peak_bytes();
    const size_t card_peak = backend.gpu_device_peak_bytes();  // the runs table's gpu_peak_bytes
    if (card_peak > 0) results["gpu_device_peak_bytes"] = card_peak;
    results["updated_at"] = utc_now();
    write_file_atomically(results_path, [&](std::ostream& out) { out << results.dump(2) << '\n'; });

    if (!o.db_path.empty()) {
      json row = {{"created_at", utc_now()}, {"run_id", run_id}, {"config_hash", config_hash},
                  {"bioquant_version", o.version}, {"model", o.model}, {"model_hash", o.model_hash},
                  {"quant", o.quant}, {"backend", o.backend}, {"device", o.device}, {"threads", o.threads},
                  {"task", task.name}, {"split", split}, {"method", prompt_method_name(o.method)},
                  {"shots", summary["shots"]}, {"seed", o.seed}, {"scoring", scoring_mode_name(scoring)},
                  {"prompt_style", style}, {"chat_template", o.chat}, {"metric", summary["metric"]},
                  {"score", summary["score"]}, {"ci_low", summary["ci95"][0]}, {"ci_high", summary["ci95"][1]},
                  {"n", summary["n"]}, {"unparsed", summary["unparsed"]}, {"prompt_tokens_computed", computed},
                  {"prompt_tokens_reused", reused}, {"generated_tokens", generated}, {"seconds", seconds},
                  {"peak_rss_bytes", peak_rss_bytes()}, {"weight_bytes", o.weight_bytes},
                  {"config_json", config.dump()}, {"result_json", summary.dump()},
                  {"out_dir", o.out_dir}, {"samples", samples_path},
                  {"sweep_cell", o.sweep_cell.empty() ? json(nullptr) : json(o.sweep_cell)},
                  {"gpu_peak_bytes", card_peak > 0 ? json(card_peak) : json(nullptr)}};
      record_runs(o.db_path, {row});
    }
  }
  return results;
}

}  // namespace bioquant::eval
