// `sweep`, `report`, `estimate` and `recommend`: the study from one plan file, its tables and
// figures, memory sizing before a download, and what to deploy within a budget. Thin shells over
// bioquant/report; they register themselves (no central list).
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <sstream>

#include <nlohmann/json.hpp>

#include "bioquant/core/error.h"
#include "bioquant/eval/prompts.h"
#include "bioquant/eval/runner.h"
#include "bioquant/eval/store.h"
#include "bioquant/eval/task.h"
#include "bioquant/report/estimate.h"
#include "bioquant/report/recommend.h"
#include "bioquant/report/report.h"
#include "bioquant/report/results.h"
#include "bioquant/report/sweep.h"
#include "cli/commands.h"
#include "cli/common.h"

namespace bioquant::cli {

using nlohmann::json;
namespace fs = std::filesystem;
using namespace bioquant::report;

namespace {

std::vector<std::string> split_list(const std::string& text) {
  std::vector<std::string> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    item.erase(0, item.find_first_not_of(" \t"));
    item.erase(item.find_last_not_of(" \t") + 1);
    if (!item.empty()) out.push_back(item);
  }
  return out;
}

Run add_sweep(CLI::App& app) {
  struct Flags {
    std::string plan, db = "bioquant.sqlite", data_dir, shard, out;
    std::vector<std::string> task_files;
    int threads = 0, batch = 1;
    bool quiet = false, verbose = false, dry_run = false;
  };
  auto f = std::make_shared<Flags>();
  app.add_option("PLAN", f->plan, "plan JSON: models, precisions, tasks, methods (+ shots, limit, split, device, "
                                  "scoring, max_new_tokens, seed)")
      ->required();
  app.add_option("--db", f->db, "SQLite results database (default bioquant.sqlite)");
  app.add_option("--data-dir", f->data_dir, "benchmark data (default: $BIOQUANT_DATA, else ../shared/bionlp)");
  app.add_option("--shard", f->shard, "i/n: run every n-th cell from the i-th (1-based), for parallel processes");
  app.add_option("--out", f->out, "directory of the cells' eval outputs (default: <db name>-sweep beside the database)");
  app.add_option("--task-file", f->task_files, "add a task from a JSON description (repeatable)");
  app.add_option("--threads", f->threads, "CPU threads (default: all cores)")->check(non_negative_number());
  app.add_option("--batch", f->batch, "examples answered together in generate scoring (default 1; as eval --batch)")
      ->check(CLI::Range(1, 256));
  app.add_flag("--dry-run", f->dry_run, "list the cells (and which are finished) without running any");
  app.add_flag("--quiet", f->quiet, "no progress lines");
  app.add_flag("--verbose", f->verbose, "the evaluation's per-example progress lines too");
  return [=]() {
    for (const auto& file : f->task_files) eval::register_task(eval::load_task_file(file));
    const SweepPlan plan = load_sweep_plan(f->plan);
    SweepOptions o;
    o.db_path = f->db;
    o.out_dir = f->out;
    if (!f->data_dir.empty()) o.data_dir = f->data_dir;
    if (!f->shard.empty()) o.shard = parse_shard(f->shard);
    o.threads = f->threads;
    o.batch = f->batch;
    o.version = BIOQUANT_VERSION;
    o.progress = !f->quiet;
    o.example_progress = f->verbose;
    if (f->dry_run) {
      std::vector<std::string> hashes;
      for (const auto& m : plan.models) hashes.push_back(eval::model_fingerprint(m));
      const auto cells = shard_cells(enumerate_cells(plan, hashes, o.out_dir.empty() ? default_sweep_dir(o.db_path) : o.out_dir),
                                     o.shard);
      const auto done = finished_cell_keys(o.db_path);
      for (const auto& c : cells) {
        const bool finished = std::binary_search(done.begin(), done.end(), c.key);
        std::printf("%zu\t%s\t%s\t%s\t%s\t%s\t%s\n", c.index + 1, finished ? "finished" : "to-run", c.model_name.c_str(),
                    c.precision.c_str(), c.method.c_str(), c.task.c_str(), c.key.c_str());
      }
      return 0;
    }
    const SweepSummary s = run_sweep(plan, o);
    std::printf("%s\n", json{{"cells", s.cells},
                             {"in_shard", s.in_shard},
                             {"finished_before", s.finished_before},
                             {"ran", s.ran},
                             {"seconds", s.seconds},
                             {"sweep_dir", s.sweep_dir},
                             {"db", o.db_path}}
                            .dump()
                            .c_str());
    return 0;
  };
}

Run add_report(CLI::App& app) {
  struct Flags {
    std::string db = "bioquant.sqlite", out = "bioquant-report", title;
    int bootstrap = 1000;
    uint64_t seed = 1234;
  };
  auto f = std::make_shared<Flags>();
  app.add_option("--db", f->db, "SQLite results database (default bioquant.sqlite)");
  app.add_option("--out", f->out, "output directory (default bioquant-report)");
  app.add_option("--title", f->title, "report title");
  app.add_option("--bootstrap", f->bootstrap, "paired bootstrap replicates for significance (default 1000)")
      ->check(CLI::Range(100, 100000));
  app.add_option("--seed", f->seed, "bootstrap seed (default 1234)");
  return [=]() {
    ReportOptions o;
    o.out_dir = f->out;
    o.db_path = f->db;
    o.bootstrap = f->bootstrap;
    o.seed = f->seed;
    if (!f->title.empty()) o.title = f->title;
    const ReportSummary s = write_report(eval::read_runs(f->db), o);
    for (const auto& file : s.files) std::printf("%s\n", file.c_str());
    std::fprintf(stderr,
                 "report: %zu results, %zu changes versus 16-bit (%zu paired bootstrap, %zu CI-based), %zu significant\n",
                 s.results, s.comparisons, s.paired, s.ci_based, s.significant);
    return 0;
  };
}

Run add_estimate(CLI::App& app) {
  struct Flags {
    std::string model, synthetic, dtype;
    EstimateOptions o;
    bool json_out = false;
  };
  auto f = std::make_shared<Flags>();
  auto* m = app.add_option("--model", f->model, "Hugging Face model directory: only its config.json is read (the weights need not be there)");
  auto* s = app.add_option("--synthetic", f->synthetic, "a named shape instead (llama-1b, llama3-8b, llama3-70b, ...)");
  m->excludes(s);
  app.add_option("--quant", f->o.quant, "precision to size: " + quant_names_list() + " (default: as stored)");
  app.add_flag("--double-quant", f->o.double_quant, "nf4/fp4: quantize the block scales too");
  app.add_option("--quant-policy", f->o.quant_policy, "default, all or linear (as for --quant)");
  app.add_option("--dtype", f->dtype, "storage dtype of the weights (default: config.json's torch_dtype; synthetic: bf16)");
  app.add_option("--ctx", f->o.ctx, "KV-cache positions (default 4096)")->check(positive_number());
  app.add_option("--batch", f->o.batch, "tokens per forward pass (default 512)")->check(positive_number());
  app.add_option("--threads", f->o.threads, "CPU threads (default: all cores)")->check(non_negative_number());
  app.add_option("--device", f->o.device, "cpu (default) or cuda (the GPU's memory; needs no GPU)");
  app.add_option("--kv-cache", f->o.kv_cache, "with --device cuda: the GPU KV cache, bf16 (default), f32 or q8");
  app.add_flag("--json", f->json_out, "print one JSON object");
  return [=]() {
    check(!f->model.empty() || !f->synthetic.empty(), "give --model PATH or --synthetic NAME");
    const ModelShape shape = f->model.empty()
                                 ? model_shape_synthetic(f->synthetic, f->dtype.empty() ? "bf16" : f->dtype)
                                 : model_shape_from_path(f->model, f->dtype);
    const EstimateOptions& o = f->o;
    const MemoryEstimate e = estimate_memory(shape, o);
    const ModelConfig& c = shape.config;
    // The memory of a longer cache is real, but the model was not trained to attend that far.
    const bool beyond_trained = c.max_positions > 0 && o.ctx > c.max_positions;
    if (f->json_out) {
      json out = e.to_json();
      out["model"] = shape.path;
      out["source"] = shape.source;
      out["quant"] = o.quant.empty() ? json(nullptr) : json(o.quant + (o.double_quant ? "+dq" : ""));
      out["ctx"] = o.ctx;
      out["batch"] = o.batch;
      out["device"] = o.device;
      if (o.device == "cuda") out["kv_cache_type"] = o.kv_cache.empty() ? "bf16" : o.kv_cache;
      out["parameters"] = c.parameter_count();
      out["trained_context"] = c.max_positions;
      out["beyond_trained_context"] = beyond_trained;
      std::printf("%s\n", out.dump().c_str());
      return 0;
    }
    std::printf("model        %s (%s; nothing loaded)\n", shape.path.c_str(), shape.source.c_str());
    std::printf("shape        %s, %lld layers, hidden %lld, ffn %lld, heads %lld/%lld, vocab %lld, %.3f B parameters\n",
                c.model_type.c_str(), (long long)c.n_layers, (long long)c.hidden, (long long)c.intermediate,
                (long long)c.n_heads, (long long)c.n_kv_heads, (long long)c.vocab,
                static_cast<double>(c.parameter_count()) / 1e9);
    const bool gpu = o.device == "cuda";
    if (gpu)
      std::printf("precision    %s on cuda (GPU memory), ctx %lld, batch %lld\n",
                  o.quant.empty() ? "as stored" : (o.quant + (o.double_quant ? "+dq" : "")).c_str(), (long long)o.ctx,
                  (long long)o.batch);
    else
      std::printf("precision    %s on %s, %d threads, ctx %lld, batch %lld\n",
                  o.quant.empty() ? "as stored" : (o.quant + (o.double_quant ? "+dq" : "")).c_str(), o.device.c_str(),
                  e.threads, (long long)o.ctx, (long long)o.batch);
    if (beyond_trained)
      std::printf("note         ctx %lld is beyond the model's trained context (%lld positions)\n", (long long)o.ctx,
                  (long long)c.max_positions);
    for (const auto& [fmt, b] : e.weights_by_format)
      std::printf("  weights %-8s %12s  (%.0f parameters, %.3f bits/weight)\n", fmt.c_str(),
                  format_bytes(b.bytes).c_str(), b.parameters, 8.0 * b.bytes / b.parameters);
    std::printf("  norms/biases     %12s\n", format_bytes(e.vector_bytes).c_str());
    if (gpu) {
      const std::string kv = o.kv_cache.empty() ? "bf16" : o.kv_cache;
      std::printf("  on the GPU       %12s  (all but the token embedding, which stays in host memory)\n",
                  format_bytes(e.weights_resident).c_str());
      std::printf("  KV cache (%s)%*s%12s  (%lld positions)\n", kv.c_str(), static_cast<int>(6 - kv.size()), "",
                  format_bytes(e.kv_cache).c_str(), (long long)o.ctx);
      std::printf("  workspace        %12s  (%lld-token steps)\n", format_bytes(e.activations).c_str(), (long long)o.batch);
      std::printf("  tensor-core bufs %12s  (prompts of 32+ tokens: bf16 weight tiles and activations)\n",
                  format_bytes(e.scratch).c_str());
      std::printf("  CUDA + cuBLAS    %12s  (measured on an H100, CUDA 13)\n", format_bytes(e.runtime).c_str());
      std::printf("peak estimate    %12s  (device use: weights + KV cache + workspace + buffers + context)\n",
                  format_bytes(e.total).c_str());
      for (const TensorPlan& p : e.plan)
        if (!p.note.empty()) std::printf("fallback     %s: %s\n", p.name.c_str(), p.note.c_str());
      return 0;
    }
    std::printf("  KV cache (f32)   %12s  (%lld positions)\n", format_bytes(e.kv_cache).c_str(), (long long)o.ctx);
    std::printf("  activations      %12s  (%lld-token passes)\n", format_bytes(e.activations).c_str(), (long long)o.batch);
    std::printf("  kernel scratch   %12s\n", format_bytes(e.scratch).c_str());
    std::printf("  runtime          %12s\n", format_bytes(e.runtime).c_str());
    std::printf("  load peak        %12s  (weights resident while converting %s)\n", format_bytes(e.load_peak).c_str(),
                e.load_peak_at.empty() ? "-" : e.load_peak_at.c_str());
    std::printf("peak estimate    %12s  (runtime + max(load peak, resident weights + KV cache + activations + scratch))\n",
                format_bytes(e.total).c_str());
    for (const TensorPlan& p : e.plan)
      if (!p.note.empty()) std::printf("fallback     %s: %s\n", p.name.c_str(), p.note.c_str());
    return 0;
  };
}

Run add_recommend(CLI::App& app) {
  struct Flags {
    std::string budget, tasks, db = "bioquant.sqlite", method = "best", precisions, device = "auto";
    std::vector<std::string> models;
    int64_t ctx = 4096;
    int bootstrap = 1000;
    bool json_out = false;
  };
  auto f = std::make_shared<Flags>();
  app.add_option("--budget", f->budget, "memory budget, e.g. 40GiB, 24GB, 512MiB")->required();
  app.add_option("--device", f->device,
                 "whose memory the budget is: cpu (the runs' peak RSS) or cuda (a GPU's: the card's peak use in runs "
                 "made on one; GPU estimates for the rest); default: where the measured runs ran");
  app.add_option("--tasks", f->tasks, "comma-separated tasks to average over (default: every task in the database)");
  app.add_option("--db", f->db, "SQLite results database (default bioquant.sqlite)");
  app.add_option("--method", f->method, "score with this method only (zero-shot, few-shot, few-shot-similar, cot); default best: per task "
                                        "the best method measured");
  app.add_option("--model", f->models, "also consider this model (repeatable); unmeasured pairs are sized by estimate");
  app.add_option("--precisions", f->precisions, "with --model: the precisions to consider (default bf16,int8,nf4,q4_k)");
  app.add_option("--ctx", f->ctx, "KV-cache positions for estimated memory (default 4096)")->check(positive_number());
  app.add_option("--bootstrap", f->bootstrap, "replicates of each pair's comparison with #1 (default 1000)")
      ->check(CLI::Range(1, 100000));
  app.add_flag("--json", f->json_out, "print one JSON object");
  return [=]() {
    RecommendOptions o;
    o.bootstrap = f->bootstrap;
    o.budget_bytes = parse_byte_size(f->budget);
    if (!f->tasks.empty())
      for (const auto* t : eval::select_tasks(f->tasks)) o.tasks.push_back(t->name);
    if (f->method != "best") o.method = eval::prompt_method_name(eval::parse_prompt_method(f->method));
    o.ctx = f->ctx;
    // cuda:N names a card; the budget is then that card's kind of memory (the name alone: no driver call).
    if (f->device != "auto") o.device = parse_device_name(f->device) < 0 ? "cpu" : "cuda";
    const std::vector<std::string> precisions =
        f->precisions.empty() ? std::vector<std::string>{"bf16", "int8", "nf4", "q4_k"} : split_list(f->precisions);
    check(f->precisions.empty() || !f->models.empty(), "--precisions needs --model");
    for (const auto& p : precisions) {
      const bool dq = p.size() > 3 && p.compare(p.size() - 3, 3, "+dq") == 0;
      parse_quant_recipe(dq ? p.substr(0, p.size() - 3) : p, dq);
    }
    for (const auto& m : f->models)
      for (const auto& p : precisions) o.extra_pairs.emplace_back(m, p);
    const std::vector<json> rows = fs::exists(f->db) || f->models.empty() ? eval::read_runs(f->db) : std::vector<json>{};
    const Recommendation r = recommend(rows, o);
    if (f->json_out) {
      std::printf("%s\n", r.to_json(o.budget_bytes).dump().c_str());
      return 0;
    }
    std::string tasks;
    for (const auto& t : r.tasks) tasks += (tasks.empty() ? "" : ", ") + t;
    std::printf("budget %s%s; mean score over %s\n", format_bytes(o.budget_bytes).c_str(),
                r.device == "cuda" ? " of GPU memory" : "", tasks.c_str());
    if (r.ranked.empty()) std::printf("nothing fits: no measured pair within the budget\n");
    for (const auto& c : r.ranked)
      std::printf("%2d. %-24s %-9s score %.4f  memory %-11s %s\n", c.rank, c.model_name.c_str(),
                  report::precision_label(c.precision).c_str(),
                  *c.mean_score, format_bytes(*c.memory_bytes).c_str(), c.reason.c_str());
    if (r.smaller_within_noise) {
      const Candidate& c = r.ranked[*r.smaller_within_noise];
      std::printf("within noise of #1 and smaller: #%d %s %s (%s %s against %s)\n", c.rank, c.model_name.c_str(),
                  report::precision_label(c.precision).c_str(), format_bytes(*c.memory_bytes).c_str(),
                  c.memory_source.c_str(), format_bytes(*r.ranked[0].memory_bytes).c_str());
    }
    for (const auto& c : r.excluded)
      std::printf(" -  %-24s %-9s excluded: %s\n", c.model_name.c_str(), report::precision_label(c.precision).c_str(),
                  c.reason.c_str());
    return 0;
  };
}

const CommandRegistration reg_sweep(110, "sweep", "Run a study plan (models x precisions x tasks x methods), resumably",
                                    add_sweep);
const CommandRegistration reg_report(120, "report", "HTML report with charts, Markdown and CSV tables from the results",
                                     add_report);
const CommandRegistration reg_estimate(130, "estimate", "Predict the memory of a model at a precision from config.json alone",
                                       add_estimate);
const CommandRegistration reg_recommend(140, "recommend", "Rank (model, precision) pairs that fit a memory budget by score",
                                        add_recommend);

}  // namespace

}  // namespace bioquant::cli
