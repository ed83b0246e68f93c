// `bioquant demo`: the main job out of the box. The shipped model (models/biomed-tiny) on the eight
// benchmarks at 16, 8 and 4 bits, with 95% CIs, the change against 16-bit (paired bootstrap) and the
// memory each precision took.
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <map>

#include <nlohmann/json.hpp>

#include "bioquant/core/atomic_file.h"
#include "bioquant/core/error.h"
#include "bioquant/core/memory.h"
#include "bioquant/eval/runner.h"
#include "bioquant/eval/stats.h"
#include "bioquant/eval/store.h"
#include "bioquant/report/report.h"
#include "bioquant/report/results.h"
#include "bioquant/tokenizer/tokenizer.h"
#include "cli/commands.h"
#include "cli/common.h"

namespace bioquant::cli {

namespace fs = std::filesystem;
using nlohmann::json;
using namespace bioquant::eval;

namespace {

// The shipped model: beside the binary (build/bioquant -> models/), else under the working directory.
std::string default_model_dir() {
  std::vector<fs::path> candidates;
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) {
    candidates.push_back(exe.parent_path() / "../models/biomed-tiny");
    candidates.push_back(exe.parent_path() / "../share/bioquant/models/biomed-tiny");
  }
  candidates.push_back("models/biomed-tiny");
  for (const auto& c : candidates)
    if (fs::is_regular_file(c / "config.json")) return fs::weakly_canonical(c).string();
  throw Error("the demo model models/biomed-tiny was not found beside the binary or in the working directory; "
              "pass --model PATH");
}

std::string cell(const json& t) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.3f [%.2f,%.2f]", t["score"].get<double>(), t["ci95"][0].get<double>(),
                t["ci95"][1].get<double>());
  return buf;
}

}  // namespace

Run add_demo(CLI::App& app) {
  struct Flags {
    std::string model, data_dir, out = "bioquant-demo", precisions = "bf16,int8,nf4,q4_k", tasks = "all", device = "cpu";
    int64_t limit = 25;
    int threads = 0, batch = 1;
  };
  auto f = std::make_shared<Flags>();
  app.add_option("--model", f->model, "model directory (default: the shipped models/biomed-tiny)");
  app.add_option("--limit", f->limit, "examples per task (default 25; 0 = the whole split)")->check(non_negative_number());
  app.add_option("--data-dir", f->data_dir, "benchmark data (default: $BIOQUANT_DATA, else ../shared/bionlp)");
  app.add_option("--out", f->out, "output directory (default bioquant-demo)");
  app.add_option("--precisions", f->precisions, "comma-separated (default bf16,int8,nf4,q4_k)");
  app.add_option("--tasks", f->tasks, "tasks (default all)");
  app.add_option("--threads", f->threads, "CPU threads (default: all cores)")->check(non_negative_number());
  app.add_option("--device", f->device, "cpu (default), cuda or cuda:N");
  app.add_option("--batch", f->batch, "examples answered together (default 1; as eval --batch)")->check(CLI::Range(1, 256));
  return [=]() {
    const auto t_start = std::chrono::steady_clock::now();
    const int device = parse_device(f->device);
    const std::string model_dir = f->model.empty() ? default_model_dir() : f->model;
    std::vector<std::string> precisions;
    {
      std::string rest = f->precisions;
      while (!rest.empty()) {
        const size_t comma = rest.find(',');
        precisions.push_back(rest.substr(0, comma));
        rest = comma == std::string::npos ? "" : rest.substr(comma + 1);
      }
    }
    check(!precisions.empty(), "--precisions is empty");
    for (const auto& p : precisions) {
      Common probe;
      probe.quant = p == "bf16" ? "" : p;
      recipe_of(probe);  // validates the name before any work
    }
    EvalOptions base;
    base.tasks = select_tasks(f->tasks);
    if (!f->data_dir.empty()) base.data_dir = f->data_dir;
    for (const TaskSpec* t : base.tasks) resolve_data_dir(base.data_dir, *t);  // fail fast
    base.limit = f->limit;
    base.version = BIOQUANT_VERSION;
    base.db_path = (fs::path(f->out) / "bioquant.sqlite").string();
    base.model = model_dir;
    base.model_hash = model_fingerprint(model_dir);
    base.backend = "local";
    base.device = f->device;
    base.batch = f->batch;
    fs::create_directories(f->out);
    std::fprintf(stderr, "demo: %s on %zu tasks x %zu precisions, %lld examples each (results in %s)\n",
                 model_dir.c_str(), base.tasks.size(), precisions.size(), static_cast<long long>(f->limit),
                 f->out.c_str());

    struct PrecisionRun {
      std::string name;
      json results;
      size_t weight_bytes = 0, peak_rss = 0, gpu_peak = 0, card_peak = 0;
      double seconds = 0;
    };
    std::vector<PrecisionRun> runs;
    for (const auto& p : precisions) {
      const bool peak_reset = reset_peak_rss();
      const auto t0 = std::chrono::steady_clock::now();
      Common c;
      c.model = model_dir;
      c.threads = f->threads;
      c.quant = p == "bf16" ? "" : p;  // the shipped model is stored in bf16
      ThreadPool pool(c.threads);
      auto model = open_model(c, pool);
      auto tokenizer = load_tokenizer(model_dir);
      LocalBackend backend(*model, *tokenizer, pool, true, device);
      EvalOptions o = base;
      o.chat = backend.applies_chat_template();
      o.quant = c.quant.empty() ? "none" : c.quant;
      o.threads = pool.size();
      o.weight_bytes = static_cast<int64_t>(model->weight_bytes());
      o.out_dir = (fs::path(f->out) / p).string();
      std::fprintf(stderr, "demo: precision %s (weights %.1f MiB)\n", p.c_str(),
                   static_cast<double>(model->weight_bytes()) / (1 << 20));
      PrecisionRun run;
      run.name = p;
      run.results = run_eval(o, backend);
      run.weight_bytes = model->weight_bytes();
      run.peak_rss = peak_rss_bytes();
      run.gpu_peak = backend.gpu_peak_bytes();
      run.card_peak = backend.gpu_device_peak_bytes();  // each precision's decoder is gone before the next
      run.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (!peak_reset) std::fprintf(stderr, "note: peak RSS could not be reset; it is the process's peak so far\n");
      runs.push_back(std::move(run));
    }

    // Scores per task and precision; change against the first precision (16-bit) by paired bootstrap.
    std::printf("\nScores (95%% bootstrap CI), %s, %lld examples per task, zero-shot, generate:\n\n",
                fs::path(model_dir).filename().c_str(), static_cast<long long>(f->limit));
    std::printf("%-13s %-15s", "task", "metric");
    for (const auto& r : runs) std::printf(" %-22s", r.name.c_str());
    std::printf("\n");
    json summary = {{"model", model_dir}, {"limit", f->limit}, {"tasks", json::object()}, {"precisions", json::array()}};
    for (const TaskSpec* t : base.tasks) {
      const json& first = runs.front().results["tasks"][t->name];
      std::printf("%-13s %-15s", t->name.c_str(), first["metric"].get<std::string>().c_str());
      json row = json::object();
      for (size_t i = 0; i < runs.size(); ++i) {
        const json& tr = runs[i].results["tasks"][t->name];
        std::string text = cell(tr);
        json entry = {{"score", tr["score"]}, {"ci95", tr["ci95"]}, {"unparsed", tr["unparsed"]}};
        if (i > 0) {
          // Paired comparison on the same examples (by id), from the two runs' sample files.
          const auto samples = [](const json& task_result) {
            const std::string path = task_result["samples"].get<std::string>();
            auto set = report::read_sample_set(path);
            check(set.has_value(), path + ": not a samples file");
            return *set;
          };
          const report::PairedSamples shared = report::pair_samples(samples(first), samples(tr));
          std::vector<std::string> labels;
          for (const auto& l : first["labels"]) labels.push_back(l.get<std::string>());
          const PairedComparison cmp = compare_paired(parse_metric_kind(first["metric"].get<std::string>()), labels,
                                                      shared.gold, shared.a, shared.b);
          // As the report: a handful of examples is never called significant.
          const bool significant = cmp.n >= report::kMinPairedExamples && (cmp.ci.low > 0 || cmp.ci.high < 0);
          if (significant) text += "*";
          entry["diff_vs_" + runs.front().name] = cmp.diff;
          entry["diff_ci95"] = {cmp.ci.low, cmp.ci.high};
          entry["significant"] = significant;
        }
        std::printf(" %-22s", text.c_str());
        row[runs[i].name] = entry;
      }
      std::printf("\n");
      summary["tasks"][t->name] = row;
    }
    std::printf("(* = the paired bootstrap 95%% CI of the change against %s excludes 0)\n\n", runs.front().name.c_str());
    const bool gpu = device >= 0;
    // On a GPU: our allocations at their peak, and the card's own peak use (CUDA context included): what a
    // card needs for the run, as the runs table records it.
    std::printf("%-10s %14s %16s%s %10s\n", "precision", "weights (MiB)", "peak RSS (MiB)",
                gpu ? "  GPU peak (MiB)  card peak (MiB)" : "", "time (s)");
    for (const auto& r : runs) {
      std::printf("%-10s %14.1f %16.1f", r.name.c_str(), static_cast<double>(r.weight_bytes) / (1 << 20),
                  static_cast<double>(r.peak_rss) / (1 << 20));
      if (gpu)
        std::printf(" %15.1f %16.1f", static_cast<double>(r.gpu_peak) / (1 << 20), static_cast<double>(r.card_peak) / (1 << 20));
      std::printf(" %10.1f\n", r.seconds);
      json entry = {{"precision", r.name}, {"weight_bytes", r.weight_bytes}, {"peak_rss_bytes", r.peak_rss},
                    {"seconds", r.seconds}};
      if (gpu) {
        entry["gpu_peak_allocated_bytes"] = r.gpu_peak;
        entry["gpu_device_peak_bytes"] = r.card_peak;
      }
      summary["precisions"].push_back(entry);
    }
    summary["device"] = f->device;
    // The HTML report (charts, tables) over every run in the demo's database.
    report::ReportOptions ro;
    ro.out_dir = (fs::path(f->out) / "report").string();
    ro.db_path = base.db_path;
    ro.title = "BioQuant demo: " + fs::path(model_dir).filename().string() + " at 16, 8 and 4 bits";
    report::write_report(read_runs(base.db_path), ro);
    summary["report"] = (fs::path(ro.out_dir) / "index.html").string();
    const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
    summary["seconds"] = total;
    write_file_atomically((fs::path(f->out) / "demo.json").string(),
                          [&](std::ostream& out) { out << summary.dump(2) << '\n'; });
    std::printf("\ntotal %.0f s; report %s/report/index.html; per-run results in %s/<precision>/, all runs in %s\n",
                total, f->out.c_str(), f->out.c_str(), base.db_path.c_str());
    std::printf("biomed-tiny is a demonstration model, not a clinical tool.\n");
    return 0;
  };
}

static const CommandRegistration register_demo(5, "demo", "Run the shipped model on the 8 benchmarks at 16, 8 and 4 bits",
                                               add_demo);

}  // namespace bioquant::cli
