#include "bioquant/report/recommend.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <set>

#include "bioquant/core/error.h"
#include "bioquant/report/estimate.h"
#include "bioquant/report/results.h"

namespace bioquant::report {

using nlohmann::json;
namespace fs = std::filesystem;

namespace {

std::string fmt_score(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.4f", v);
  return buf;
}

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
  return s;
}

// Estimated peak of a pair that was never measured: from the model's config.json / GGUF header.
std::optional<double> estimated_memory(const std::string& model, const std::string& precision, int64_t ctx,
                                       const std::string& device) {
  try {
    EstimateOptions o;
    o.ctx = ctx;
    o.device = device;
    if (precision != "none") {
      const bool dq = precision.size() > 3 && precision.compare(precision.size() - 3, 3, "+dq") == 0;
      o.quant = dq ? precision.substr(0, precision.size() - 3) : precision;
      o.double_quant = dq;
    }
    return estimate_memory(model_shape_from_path(model), o).total;
  } catch (const Error&) {
    return std::nullopt;
  }
}

// The change of b's mean score against a's over the tasks, from the samples files of the runs that
// gave each task's score; nullopt (and why) when a task has no samples or too few shared examples.
std::optional<eval::MeanDifference> compare_with(const Candidate& a, const Candidate& b, const std::vector<std::string>& tasks,
                                                 const std::map<int64_t, const RunResult*>& by_id,
                                                 SampleFiles& samples, const RecommendOptions& o,
                                                 std::string& why_not) {
  // Tasks in name order, as compare-runs takes them: the same pair of runs gets the same interval.
  std::vector<std::string> ordered = tasks;
  std::sort(ordered.begin(), ordered.end());
  std::vector<eval::PairedTask> paired;
  for (const auto& t : ordered) {
    const RunResult& ra = *by_id.at(a.task_row_ids.at(t));
    const RunResult& rb = *by_id.at(b.task_row_ids.at(t));
    const auto& sa = samples.get(ra.samples);
    const auto& sb = samples.get(rb.samples);
    if (!sa || !sb) {
      why_not = "no per-example samples for " + t;
      return std::nullopt;
    }
    PairedSamples shared;
    try {
      shared = pair_samples(*sa, *sb);
    } catch (const std::exception&) {
      why_not = "unreadable samples for " + t;
      return std::nullopt;
    }
    if (static_cast<int64_t>(shared.gold.size()) < kMinPairedExamples) {
      why_not = "fewer than " + std::to_string(kMinPairedExamples) + " examples of " + t + " shared with #1";
      return std::nullopt;
    }
    paired.push_back({eval::parse_metric_kind(ra.metric), ra.labels, std::move(shared.gold), std::move(shared.a),
                      std::move(shared.b)});
  }
  return eval::compare_paired_mean(paired, o.bootstrap, o.seed);
}

}  // namespace

Recommendation recommend(const std::vector<json>& rows, const RecommendOptions& o) {
  check(o.budget_bytes > 0, "--budget must be positive");
  check(o.device == "cpu" || o.device == "cuda" || o.device == "auto",
        "--device: expected cpu or cuda, got '" + o.device + "'");
  const std::vector<RunResult> results = latest_results(rows);
  Recommendation rec;
  rec.device = o.device;
  if (rec.device == "auto") {
    bool on_gpu = false, on_cpu = false;
    for (const auto& r : results) {
      on_gpu = on_gpu || r.gpu_peak_bytes.has_value();
      on_cpu = on_cpu || (!r.gpu_peak_bytes && r.peak_rss_bytes);
    }
    check(!(on_gpu && on_cpu), "the results hold runs measured on the CPU and on a GPU: say whose memory the budget is "
                               "(--device cpu or --device cuda)");
    rec.device = on_gpu ? "cuda" : "cpu";
  }
  const bool gpu = rec.device == "cuda";
  if (o.tasks.empty()) {
    std::set<std::string> seen;
    for (const auto& r : results)
      if (seen.insert(r.task).second) rec.tasks.push_back(r.task);
  } else {
    rec.tasks = o.tasks;
  }
  check(!rec.tasks.empty(), "the results database holds no runs (run bioquant sweep or eval first)");

  // The pairs, in the results' order, then the extra ones.
  std::vector<Candidate> pairs;
  auto find_pair = [&](const std::string& model, const std::string& precision) -> Candidate* {
    for (auto& c : pairs)
      if (c.model == model && c.precision == precision) return &c;
    return nullptr;
  };
  for (const auto& r : results) {
    if (!find_pair(r.model, r.precision)) {
      Candidate c;
      c.model = r.model;
      c.model_name = r.model_name;
      c.precision = r.precision;
      pairs.push_back(c);
    }
    Candidate& c = *find_pair(r.model, r.precision);
    // The budget's kind of memory only: a run on the CPU says nothing of a GPU's, and a GPU run's host
    // RSS nothing of its card's.
    const bool ran_on_gpu = r.gpu_peak_bytes.has_value();
    const std::optional<double> peak = gpu ? r.gpu_peak_bytes : ran_on_gpu ? std::nullopt : r.peak_rss_bytes;
    if (peak) {
      c.memory_bytes = std::max(c.memory_bytes.value_or(0.0), *peak);
      c.memory_source = "measured";
    }
    if (std::find(rec.tasks.begin(), rec.tasks.end(), r.task) == rec.tasks.end()) continue;
    if (o.method != "best" && r.method != o.method) continue;
    // best: the best-scoring method measured for the task; a named method: its latest run.
    auto it = c.task_scores.find(r.task);
    const bool take = it == c.task_scores.end() ||
                      (o.method == "best" ? r.score > it->second : r.id > c.task_row_ids[r.task]);
    if (take) {
      c.task_scores[r.task] = r.score;
      c.task_row_ids[r.task] = r.id;
      c.task_methods[r.task] = r.method + (r.method.rfind("few-shot", 0) == 0 ? " (" + std::to_string(r.shots) + " shots)" : "");
    }
  }
  for (const auto& [model, precision] : o.extra_pairs) {
    if (find_pair(model, precision)) continue;
    Candidate c;
    c.model = model;
    fs::path p = fs::path(model).lexically_normal();
    if (p.filename().empty()) p = p.parent_path();
    c.model_name = p.filename().empty() ? model : p.filename().string();
    for (const auto& other : pairs)  // the short name the results already use for this model
      if (other.model == model) c.model_name = other.model_name;
    c.precision = precision;
    pairs.push_back(c);
  }

  for (auto& c : pairs) {
    if (!c.memory_bytes) {
      c.memory_bytes = estimated_memory(c.model, c.precision, o.ctx, rec.device);
      if (c.memory_bytes) c.memory_source = "estimated";
    }
    std::vector<std::string> missing;
    for (const auto& t : rec.tasks)
      if (!c.task_scores.count(t)) missing.push_back(t);
    if (missing.empty()) {
      double sum = 0;
      for (const auto& t : rec.tasks) sum += c.task_scores[t];
      c.mean_score = sum / static_cast<double>(rec.tasks.size());
    }
    c.fits = c.memory_bytes && *c.memory_bytes <= o.budget_bytes;
    std::vector<std::string> why;
    const bool unmeasured = c.task_scores.empty() && missing.size() == rec.tasks.size();
    if (unmeasured)
      why.push_back("no measured scores" + std::string(o.method == "best" ? "" : " with method " + o.method) +
                    " on the requested tasks");
    else if (!missing.empty())
      why.push_back("not measured on " + join(missing) + (o.method == "best" ? "" : " with method " + o.method));
    if (!c.memory_bytes)
      why.push_back(std::string("memory unknown: no ") + (gpu ? "peak measured on a GPU" : "measured peak") +
                    " and no config.json at " + c.model + " to estimate from");
    else if (!c.fits)
      why.push_back("needs " + format_bytes(*c.memory_bytes) + " (" + c.memory_source + ") > budget " +
                    format_bytes(o.budget_bytes));
    if (why.empty()) {
      rec.ranked.push_back(c);
    } else {
      std::string reason;
      for (const auto& w : why) reason += (reason.empty() ? "" : "; ") + w;
      if (c.memory_bytes && c.fits && !c.mean_score)
        reason += " (" + c.memory_source + " " + format_bytes(*c.memory_bytes) + " would fit" +
                  (unmeasured ? "; run bioquant sweep to measure it)" : ")");
      c.reason = reason;
      rec.excluded.push_back(c);
    }
  }
  std::stable_sort(rec.ranked.begin(), rec.ranked.end(), [](const Candidate& a, const Candidate& b) {
    if (*a.mean_score != *b.mean_score) return *a.mean_score > *b.mean_score;
    if (*a.memory_bytes != *b.memory_bytes) return *a.memory_bytes < *b.memory_bytes;
    return a.model_name + " " + a.precision < b.model_name + " " + b.precision;
  });
  std::map<int64_t, const RunResult*> by_id;
  for (const auto& r : results) by_id[r.id] = &r;
  SampleFiles samples;
  for (size_t i = 0; i < rec.ranked.size(); ++i) {
    Candidate& c = rec.ranked[i];
    c.rank = static_cast<int>(i + 1);
    const std::string mem = format_bytes(*c.memory_bytes) + " " + c.memory_source;
    if (i == 0) {
      c.reason = "chosen: best mean score (" + fmt_score(*c.mean_score) + " over " + std::to_string(rec.tasks.size()) +
                 " task" + (rec.tasks.size() == 1 ? "" : "s") + ") of the " + std::to_string(rec.ranked.size()) +
                 " pair" + (rec.ranked.size() == 1 ? "" : "s") + " that fit " + format_bytes(o.budget_bytes) + "; uses " +
                 mem;
    } else {
      const double gap = *rec.ranked[0].mean_score - *c.mean_score;
      const Candidate& prev = rec.ranked[i - 1];
      c.reason = "fits (" + mem + "); mean score " + fmt_score(*c.mean_score) + ", " + fmt_score(gap) + " below #1";
      c.vs_best = compare_with(rec.ranked[0], c, rec.tasks, by_id, samples, o, c.untested);
      if (c.vs_best) {
        c.within_noise = c.vs_best->ci.low <= 0 && c.vs_best->ci.high >= 0;
        c.reason += " (95% CI of the change [" + fmt_score(c.vs_best->ci.low) + ", " + fmt_score(c.vs_best->ci.high) +
                    "]: " + (c.within_noise ? "within noise)" : "beyond noise)");
        const double least = rec.smaller_within_noise ? *rec.ranked[*rec.smaller_within_noise].memory_bytes
                                                      : *rec.ranked[0].memory_bytes;
        if (c.within_noise && *c.memory_bytes < least) rec.smaller_within_noise = i;
      } else {
        c.reason += " (not compared: " + c.untested + ")";
      }
      if (*prev.mean_score == *c.mean_score)
        c.reason += "; tied with #" + std::to_string(i) +
                    (*prev.memory_bytes < *c.memory_bytes ? ", which uses less memory" : ", ranked by name");
    }
  }
  std::stable_sort(rec.excluded.begin(), rec.excluded.end(), [](const Candidate& a, const Candidate& b) {
    const double sa = a.mean_score.value_or(-1), sb = b.mean_score.value_or(-1);
    if (sa != sb) return sa > sb;
    return a.model_name + " " + a.precision < b.model_name + " " + b.precision;
  });
  return rec;
}

json Recommendation::to_json(double budget_bytes) const {
  auto cand = [](const Candidate& c) {
    json scores = json::object();
    for (const auto& [t, s] : c.task_scores) scores[t] = {{"score", s}, {"method", c.task_methods.at(t)}};
    json j{{"model", c.model},
           {"model_name", c.model_name},
           {"precision", c.precision},
           {"rank", c.rank},
           {"mean_score", c.mean_score ? json(*c.mean_score) : json(nullptr)},
           {"memory_bytes", c.memory_bytes ? json(*c.memory_bytes) : json(nullptr)},
           {"memory_source", c.memory_source.empty() ? json(nullptr) : json(c.memory_source)},
           {"fits", c.fits},
           {"task_scores", scores},
           {"reason", c.reason}};
    if (c.vs_best)
      j["vs_best"] = {{"diff", c.vs_best->diff},
                      {"ci_low", c.vs_best->ci.low},
                      {"ci_high", c.vs_best->ci.high},
                      {"p_value", c.vs_best->p_value},
                      {"examples", c.vs_best->n},
                      {"within_noise", c.within_noise}};
    else if (c.rank > 1)
      j["vs_best"] = {{"untested", c.untested}};
    return j;
  };
  json out = {{"budget_bytes", budget_bytes}, {"device", device}, {"tasks", tasks}, {"ranked", json::array()},
              {"excluded", json::array()}};
  for (const auto& c : ranked) out["ranked"].push_back(cand(c));
  for (const auto& c : excluded) out["excluded"].push_back(cand(c));
  out["recommended"] = ranked.empty() ? json(nullptr) : cand(ranked.front());
  out["smaller_within_noise"] = smaller_within_noise ? cand(ranked[*smaller_within_noise]) : json(nullptr);
  return out;
}

}  // namespace bioquant::report
