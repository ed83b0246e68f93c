#include "bioquant/report/sweep.h"

#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <set>

#include "bioquant/core/error.h"
#include "bioquant/core/hash.h"
#include "bioquant/core/mapped_file.h"
#include "bioquant/core/progress.h"
#include "bioquant/core/thread_pool.h"
#include "bioquant/eval/backend.h"
#include "bioquant/eval/prompts.h"
#include "bioquant/eval/runner.h"
#include "bioquant/eval/store.h"
#include "bioquant/eval/task.h"
#include "bioquant/kernels/cuda/gpu_decoder.h"
#include "bioquant/model/model.h"
#include "bioquant/model/quantize.h"
#include "bioquant/tokenizer/tokenizer.h"

namespace bioquant::report {

using nlohmann::json;
namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

namespace {

const std::vector<std::string>& known_keys() {
  static const std::vector<std::string> keys = {"models", "precisions", "tasks",  "methods",        "shots", "limit",
                                                "split",  "device",     "scoring", "max_new_tokens", "seed",
                                                "numerics"};
  return keys;
}

std::string join(const std::vector<std::string>& v, const std::string& sep = ", ") {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : sep) + x;
  return s;
}

std::vector<std::string> string_list(const json& plan, const std::string& key, const std::string& where,
                                     bool allow_all = false) {
  check(plan.contains(key), where + ": missing \"" + key + "\" (a list of names)");
  const json& v = plan[key];
  if (allow_all && v.is_string() && v.get<std::string>() == "all") return {"all"};
  check(v.is_array() && !v.empty(), where + ": \"" + key + "\" must be a non-empty list of strings");
  std::vector<std::string> out;
  for (const auto& item : v) {
    check(item.is_string() && !item.get<std::string>().empty(), where + ": \"" + key + "\" must hold strings only");
    const std::string s = item.get<std::string>();
    check(std::find(out.begin(), out.end(), s) == out.end(), where + ": \"" + key + "\" lists '" + s + "' twice");
    out.push_back(s);
  }
  return out;
}

int64_t integer(const json& plan, const std::string& key, const std::string& where, int64_t fallback, int64_t min) {
  if (!plan.contains(key)) return fallback;
  check(plan[key].is_number_integer(), where + ": \"" + key + "\" must be an integer");
  const int64_t v = plan[key].get<int64_t>();
  check(v >= min, where + ": \"" + key + "\" must be >= " + std::to_string(min));
  return v;
}

std::string text(const json& plan, const std::string& key, const std::string& where, const std::string& fallback) {
  if (!plan.contains(key)) return fallback;
  check(plan[key].is_string(), where + ": \"" + key + "\" must be a string");
  return plan[key].get<std::string>();
}

// "nf4+dq" -> (nf4, double quant).
QuantRecipe precision_recipe(const std::string& precision) {
  const bool dq = precision.size() > 3 && precision.compare(precision.size() - 3, 3, "+dq") == 0;
  return parse_quant_recipe(dq ? precision.substr(0, precision.size() - 3) : precision, dq);
}

std::string model_label(const std::string& path) {
  fs::path p = fs::path(path).lexically_normal();
  if (p.filename().empty()) p = p.parent_path();
  std::string name = p.filename().string();
  if (name.size() > 5 && name.compare(name.size() - 5, 5, ".gguf") == 0) name.resize(name.size() - 5);
  return name.empty() ? "model" : name;
}

}  // namespace

SweepPlan parse_sweep_plan(const json& plan, const std::string& where, const std::string& base_dir) {
  check(plan.is_object(), where + ": a sweep plan is a JSON object");
  for (const auto& [key, value] : plan.items()) {
    (void)value;
    check(std::find(known_keys().begin(), known_keys().end(), key) != known_keys().end(),
          where + ": unknown key \"" + key + "\" (known: " + join(known_keys()) + ")");
  }
  SweepPlan p;
  for (const std::string& m : string_list(plan, "models", where)) {
    const fs::path path = fs::path(m).is_absolute() ? fs::path(m) : fs::path(base_dir) / m;
    const std::string resolved = path.lexically_normal().string();
    check(fs::exists(resolved), where + ": model '" + m + "' not found (looked at " + resolved + ")");
    p.models.push_back(resolved);
  }
  p.precisions = string_list(plan, "precisions", where);
  for (const auto& q : p.precisions) {
    try {
      precision_recipe(q);
    } catch (const Error& e) {
      throw Error(where + ": precision '" + q + "': " + e.what());
    }
  }
  const std::vector<std::string> tasks = string_list(plan, "tasks", where, /*allow_all=*/true);
  if (tasks.size() == 1 && tasks[0] == "all") {
    for (const auto* t : eval::select_tasks("all")) p.tasks.push_back(t->name);
  } else {
    for (const auto& t : tasks) {
      try {
        p.tasks.push_back(eval::find_task(t).name);
      } catch (const Error& e) {
        throw Error(where + ": " + e.what());
      }
    }
  }
  p.methods = string_list(plan, "methods", where);
  for (const auto& m : p.methods) {
    try {
      eval::parse_prompt_method(m);
    } catch (const Error& e) {
      throw Error(where + ": " + e.what());
    }
  }
  p.shots = static_cast<int>(integer(plan, "shots", where, 5, 1));
  check(p.shots <= 64, where + ": \"shots\" must be <= 64");
  p.limit = integer(plan, "limit", where, 0, 0);
  p.max_new_tokens = static_cast<int>(integer(plan, "max_new_tokens", where, 0, 0));
  check(p.max_new_tokens <= 8192, where + ": \"max_new_tokens\" must be <= 8192");
  p.seed = static_cast<uint64_t>(integer(plan, "seed", where, 1234, 0));
  p.split = text(plan, "split", where, "");
  p.device = text(plan, "device", where, "cpu");
  const std::string numerics = text(plan, "numerics", where, "default");
  check(numerics == "default" || numerics == "exact", where + ": \"numerics\" must be \"default\" or \"exact\"");
  p.exact = numerics == "exact";
  // The name only: whether the device is there is checked in the worker, before it loads a model (this
  // process must not initialise CUDA, which does not survive into the forked workers).
  try {
    parse_device_name(p.device);
  } catch (const Error& e) {
    throw Error(where + ": " + e.what());
  }
  p.scoring = text(plan, "scoring", where, "generate");
  try {
    eval::parse_scoring_mode(p.scoring);
  } catch (const Error& e) {
    throw Error(where + ": " + e.what());
  }
  return p;
}

SweepPlan load_sweep_plan(const std::string& path) {
  check(fs::exists(path), path + ": no such plan file");
  check(fs::is_regular_file(path), path + ": not a plan file (not a regular file)");
  json j;
  try {
    j = json::parse(read_text_file(path));
  } catch (const json::exception& e) {
    throw Error(path + ": not valid JSON (" + std::string(e.what()) + ")");
  }
  const std::string dir = fs::path(path).parent_path().string();
  return parse_sweep_plan(j, path, dir.empty() ? "." : dir);
}

Shard parse_shard(const std::string& t) {
  const size_t slash = t.find('/');
  Shard s;
  try {
    check(slash != std::string::npos, "");
    size_t used_i = 0, used_n = 0;
    s.index = std::stoi(t.substr(0, slash), &used_i);
    s.count = std::stoi(t.substr(slash + 1), &used_n);
    check(used_i == slash && used_n == t.size() - slash - 1, "");
  } catch (const std::exception&) {
    throw Error("--shard '" + t + "': expected i/n, e.g. 1/4 (the first of four shards)");
  }
  check(s.count >= 1 && s.index >= 1 && s.index <= s.count,
        "--shard '" + t + "': need 1 <= i <= n (shards are numbered from 1)");
  return s;
}

std::vector<SweepCell> enumerate_cells(const SweepPlan& plan, const std::vector<std::string>& model_hashes,
                                       const std::string& sweep_dir) {
  check(model_hashes.size() == plan.models.size(), "enumerate_cells: one fingerprint per model");
  std::vector<SweepCell> cells;
  for (size_t mi = 0; mi < plan.models.size(); ++mi) {
    const std::string name = model_label(plan.models[mi]);
    for (const auto& precision : plan.precisions) {
      for (const auto& method : plan.methods) {
        const bool few = eval::uses_shots(eval::parse_prompt_method(method));
        // What makes a cell's outputs (the examples it covers aside): its directory holds them, so
        // a larger limit resumes a smaller one.
        json variant = {{"model_hash", model_hashes[mi]}, {"precision", precision},
                        {"method", method},              {"shots", few ? plan.shots : 0},
                        {"seed", plan.seed},             {"scoring", plan.scoring},
                        {"split", plan.split},           {"max_new_tokens", plan.max_new_tokens},
                        {"device", plan.device}};
        if (plan.exact) variant["numerics"] = "exact";  // absent by default: earlier plans' cells keep their keys
        const std::string variant_hash = sha256_hex(variant.dump()).substr(0, 8);
        for (const auto& task : plan.tasks) {
          SweepCell c;
          c.index = cells.size();
          c.model = plan.models[mi];
          c.model_name = name;
          c.model_hash = model_hashes[mi];
          c.precision = precision;
          c.task = task;
          c.method = method;
          json identity = variant;
          identity["task"] = task;
          identity["limit"] = plan.limit;
          c.key = sha256_hex(identity.dump()).substr(0, 16);
          c.out_dir = (fs::path(sweep_dir) / (name + "-" + model_hashes[mi].substr(0, 8)) / precision /
                       (method + "-" + variant_hash) / task)
                          .string();
          cells.push_back(std::move(c));
        }
      }
    }
  }
  return cells;
}

std::vector<SweepCell> shard_cells(const std::vector<SweepCell>& cells, const Shard& shard) {
  std::vector<SweepCell> out;
  for (const auto& c : cells)
    if (c.index % static_cast<size_t>(shard.count) == static_cast<size_t>(shard.index - 1)) out.push_back(c);
  return out;
}

std::vector<std::string> finished_cell_keys(const std::string& db_path) {
  std::vector<std::string> keys;
  if (!fs::exists(db_path)) return keys;
  for (const json& row : eval::read_runs(db_path)) {
    auto it = row.find("sweep_cell");
    if (it != row.end() && it->is_string()) keys.push_back(it->get<std::string>());
  }
  std::sort(keys.begin(), keys.end());
  keys.erase(std::unique(keys.begin(), keys.end()), keys.end());
  return keys;
}

std::string default_sweep_dir(const std::string& db_path) {
  fs::path p(db_path);
  return (p.parent_path() / (p.stem().string() + "-sweep")).string();
}

namespace {

struct GroupResult {
  size_t ran = 0;
  double seconds = 0;  // in cells
  std::string error;   // "" = every cell ran
};

// Loads the group's model at its precision and runs its cells (this process).
GroupResult run_group(const SweepPlan& plan, const SweepOptions& o, const std::vector<const SweepCell*>& cells,
                      size_t position, size_t total, double seconds_before) {
  GroupResult out;
  const SweepCell& first = *cells.front();
  const int device = parse_device(plan.device);  // before any model work: a missing GPU fails at once
  ThreadPool pool(o.threads);
  const auto load0 = Clock::now();
  auto model = Model::load(first.model);
  const QuantRecipe recipe = precision_recipe(first.precision);
  const auto tensor_plan = plan_quantization(*model, recipe);
  for (const TensorPlan& p : tensor_plan)
    if (!p.note.empty() && o.progress) std::fprintf(o.log, "note: %s: %s\n", p.name.c_str(), p.note.c_str());
  quantize_model(*model, tensor_plan, pool);
  auto tokenizer = load_tokenizer(first.model);
  eval::LocalBackend backend(*model, *tokenizer, pool, /*use_chat_template=*/true, device,
                             plan.exact ? KvType::F32 : KvType::BF16, plan.exact);
  if (o.progress) {
    std::fprintf(o.log, "sweep: loaded %s as %s (%s weights, %.1f MiB) in %s\n", first.model_name.c_str(),
                 first.precision.c_str(), model->weight_dtype().c_str(),
                 static_cast<double>(model->weight_bytes()) / (1024.0 * 1024.0),
                 format_seconds(std::chrono::duration<double>(Clock::now() - load0).count()).c_str());
    std::fflush(o.log);
  }
  for (const SweepCell* cp : cells) {
    const SweepCell& c = *cp;
    eval::EvalOptions e;
    e.tasks = {&eval::find_task(c.task)};
    e.data_dir = o.data_dir;
    e.split = plan.split;
    e.method = eval::parse_prompt_method(c.method);
    e.shots = plan.shots;
    e.seed = plan.seed;
    e.scoring = eval::parse_scoring_mode(plan.scoring);
    e.chat = backend.applies_chat_template();
    e.limit = plan.limit;
    e.max_new_tokens = plan.max_new_tokens;
    e.batch = o.batch;
    e.out_dir = c.out_dir;
    e.db_path = o.db_path;
    e.progress = o.example_progress;
    e.version = o.version;
    e.model = c.model;
    e.model_hash = c.model_hash;
    e.quant = c.precision;
    e.backend = "local";
    e.device = plan.device;
    e.exact = plan.exact;
    e.threads = pool.size();
    e.weight_bytes = static_cast<int64_t>(model->weight_bytes());
    e.sweep_cell = c.key;
    const auto c0 = Clock::now();
    const json results = eval::run_eval(e, backend);
    const double secs = std::chrono::duration<double>(Clock::now() - c0).count();
    out.seconds += secs;
    ++out.ran;
    if (o.progress) {
      const size_t done = position + out.ran;
      const double per_cell = (seconds_before + out.seconds) / static_cast<double>(done);
      const json& t = results["tasks"][c.task];
      std::fprintf(o.log, "[%zu/%zu] cell %zu: %s %s %s %s: %s %.4f (n %lld, unparsed %lld) in %s; ETA %s\n", done, total,
                   c.index + 1, c.model_name.c_str(), c.precision.c_str(), c.method.c_str(), c.task.c_str(),
                   t.value("metric", "").c_str(), t.value("score", 0.0), static_cast<long long>(t.value("n", 0)),
                   static_cast<long long>(t.value("unparsed", 0)), format_seconds(secs).c_str(),
                   format_seconds(per_cell * static_cast<double>(total - done)).c_str());
      std::fflush(o.log);
    }
  }
  return out;
}

// run_group in a child process (dies with this one); its result comes back as one JSON line.
GroupResult run_group_in_child(const SweepPlan& plan, const SweepOptions& o, const std::vector<const SweepCell*>& cells,
                               size_t position, size_t total, double seconds_before) {
  std::fflush(stdout);
  std::fflush(o.log);
  int fds[2];
  check(::pipe(fds) == 0, "sweep: cannot create a pipe");
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  check(pid >= 0, "sweep: cannot start a worker process");
  if (pid == 0) {
    ::close(fds[0]);
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // a killed sweep takes its worker with it
    if (::getppid() != parent) ::_exit(3);
    json report;
    int code = 0;
    GroupResult r;
    try {
      r = run_group(plan, o, cells, position, total, seconds_before);
    } catch (const Error& e) {
      r.error = e.what();
    } catch (const std::bad_alloc&) {
      r.error = "out of memory";
    } catch (const std::exception& e) {
      r.error = std::string("internal: ") + e.what();
    }
    if (!r.error.empty()) code = 1;
    report = {{"ran", r.ran}, {"seconds", r.seconds}, {"error", r.error}};
    const std::string line = report.dump() + "\n";
    size_t written = 0;
    while (written < line.size()) {
      const ssize_t n = ::write(fds[1], line.data() + written, line.size() - written);
      if (n <= 0) break;
      written += static_cast<size_t>(n);
    }
    std::fflush(stdout);
    std::fflush(o.log);
    ::_exit(code);
  }
  ::close(fds[1]);
  std::string text;
  char buf[4096];
  for (;;) {
    const ssize_t n = ::read(fds[0], buf, sizeof buf);
    if (n > 0) {
      text.append(buf, static_cast<size_t>(n));
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else {
      break;
    }
  }
  ::close(fds[0]);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  GroupResult r;
  const json report = json::parse(text, nullptr, false);
  if (report.is_object()) {
    r.ran = report.value("ran", size_t{0});
    r.seconds = report.value("seconds", 0.0);
    r.error = report.value("error", "");
  } else if (WIFSIGNALED(status)) {
    r.error = "sweep: the worker for " + cells.front()->model_name + " " + cells.front()->precision +
              " was killed by signal " + std::to_string(WTERMSIG(status)) +
              (WTERMSIG(status) == SIGKILL ? " (out of memory?)" : "");
  } else {
    r.error = "sweep: the worker for " + cells.front()->model_name + " " + cells.front()->precision +
              " ended without a result (exit status " + std::to_string(WEXITSTATUS(status)) + ")";
  }
  return r;
}

}  // namespace

SweepSummary run_sweep(const SweepPlan& plan, const SweepOptions& o) {
  const auto t0 = Clock::now();
  check(!o.db_path.empty(), "sweep needs a results database (--db FILE)");
  SweepSummary summary;
  // Absolute, so the samples paths recorded in the database work from any directory (report).
  summary.sweep_dir =
      fs::absolute(o.out_dir.empty() ? default_sweep_dir(o.db_path) : o.out_dir).lexically_normal().string();
  // Every task's data before any model work: a bad directory fails in a second.
  for (const auto& name : plan.tasks) {
    const eval::TaskSpec& t = eval::find_task(name);
    eval::resolve_data_dir(o.data_dir, t);
    t.split(plan.split.empty() ? t.default_split : plan.split);
  }
  std::vector<std::string> hashes;
  for (const auto& m : plan.models) hashes.push_back(eval::model_fingerprint(m));
  const std::vector<SweepCell> all = enumerate_cells(plan, hashes, summary.sweep_dir);
  const std::vector<SweepCell> mine = shard_cells(all, o.shard);
  const std::vector<std::string> done_keys = finished_cell_keys(o.db_path);
  const std::set<std::string> done(done_keys.begin(), done_keys.end());
  std::vector<const SweepCell*> todo;
  for (const auto& c : mine)
    if (!done.count(c.key)) todo.push_back(&c);
  summary.cells = all.size();
  summary.in_shard = mine.size();
  summary.finished_before = mine.size() - todo.size();
  if (o.progress) {
    std::fprintf(o.log, "sweep: %zu cells (%zu models x %zu precisions x %zu methods x %zu tasks)", all.size(),
                 plan.models.size(), plan.precisions.size(), plan.methods.size(), plan.tasks.size());
    if (o.shard.count > 1) std::fprintf(o.log, ", shard %d/%d has %zu", o.shard.index, o.shard.count, mine.size());
    std::fprintf(o.log, "; %zu finished, %zu to run; outputs in %s\n", summary.finished_before, todo.size(),
                 summary.sweep_dir.c_str());
    std::fflush(o.log);
  }
  if (todo.empty()) {
    summary.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    return summary;
  }

  size_t position = 0;
  double cell_seconds = 0;
  for (size_t i = 0; i < todo.size();) {
    // One (model, precision) group: loaded and quantized once for all of its cells, in a process of
    // its own, so its recorded peak memory is its own (no allocator residue of the group before).
    size_t end = i;
    while (end < todo.size() && todo[end]->model == todo[i]->model && todo[end]->precision == todo[i]->precision) ++end;
    const std::vector<const SweepCell*> group(todo.begin() + static_cast<std::ptrdiff_t>(i),
                                              todo.begin() + static_cast<std::ptrdiff_t>(end));
    const GroupResult r = run_group_in_child(plan, o, group, position, todo.size(), cell_seconds);
    position += r.ran;
    summary.ran += r.ran;
    cell_seconds += r.seconds;
    check(r.error.empty(), r.error);
    i = end;
  }
  summary.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  if (o.progress)
    std::fprintf(o.log, "sweep: ran %zu cells in %s; results in %s\n", summary.ran,
                 format_seconds(summary.seconds).c_str(), o.db_path.c_str());
  return summary;
}

}  // namespace bioquant::report
