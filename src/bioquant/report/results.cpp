#include "bioquant/report/results.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <tuple>

#include "bioquant/eval/scoring.h"
#include "bioquant/eval/task.h"

namespace bioquant::report {

using nlohmann::json;
namespace fs = std::filesystem;

namespace {

std::string str(const json& row, const char* key) {
  auto it = row.find(key);
  return it != row.end() && it->is_string() ? it->get<std::string>() : "";
}
double num(const json& row, const char* key, double fallback = 0) {
  auto it = row.find(key);
  return it != row.end() && it->is_number() ? it->get<double>() : fallback;
}
std::optional<double> opt_num(const json& row, const char* key) {
  auto it = row.find(key);
  if (it == row.end() || !it->is_number() || it->get<double>() <= 0) return std::nullopt;
  return it->get<double>();
}

std::string base_name(const std::string& path) {
  fs::path p = fs::path(path).lexically_normal();
  if (p.filename().empty()) p = p.parent_path();
  std::string name = p.filename().string();
  if (name.size() > 5 && name.compare(name.size() - 5, 5, ".gguf") == 0) name.resize(name.size() - 5);
  return name.empty() ? path : name;
}

int task_rank(const std::string& task) {
  const auto& all = eval::all_tasks();
  for (size_t i = 0; i < all.size(); ++i)
    if (all[i].name == task) return static_cast<int>(i);
  return 1000;
}

}  // namespace

bool is_16bit_or_stored(const std::string& p) { return p == "bf16" || p == "f16" || p == "none" || p == "f32"; }

int precision_rank(const std::string& p) {
  static const std::vector<std::string> order = {"f32",  "bf16", "f16",    "none", "int8",   "q8_0",  "q6_k",  "q5_k",
                                                 "q4_k_m", "q4_k", "q4_0", "nf4", "nf4+dq", "fp4", "fp4+dq"};
  auto it = std::find(order.begin(), order.end(), p);
  return it == order.end() ? 100 : static_cast<int>(it - order.begin());
}

std::optional<SampleSet> read_sample_set(const std::string& path) {
  if (path.empty() || !fs::is_regular_file(path)) return std::nullopt;
  std::ifstream in(path);
  SampleSet s;
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    json j = json::parse(line, nullptr, false);
    if (!j.is_object() || !j.contains("id") || !j["id"].is_string() || !j.contains("parsed") || !j.contains("gold"))
      return std::nullopt;
    const std::string id = j["id"].get<std::string>();
    if (!s.by_id.count(id)) s.order.push_back(id);
    s.by_id[id] = std::move(j);
  }
  if (s.order.empty()) return std::nullopt;
  return s;
}

const std::optional<SampleSet>& SampleFiles::get(const std::string& path) {
  auto it = read_.find(path);
  if (it == read_.end()) it = read_.emplace(path, read_sample_set(path)).first;
  return it->second;
}

PairedSamples pair_samples(const SampleSet& a, const SampleSet& b) {
  PairedSamples out;
  for (const auto& id : a.order) {
    auto it = b.by_id.find(id);
    if (it == b.by_id.end()) continue;
    const json& line = a.by_id.at(id);
    out.gold.push_back(eval::gold_from_json(line["gold"]));
    out.a.push_back(eval::prediction_from_json(line["parsed"]));
    out.b.push_back(eval::prediction_from_json(it->second["parsed"]));
  }
  return out;
}

std::string precision_label(const std::string& p) { return p == "none" ? "as stored" : p; }

std::vector<RunResult> latest_results(const std::vector<json>& rows) {
  using Key = std::tuple<std::string, std::string, std::string, std::string, std::string, int64_t, std::string,
                         std::string, std::string>;
  std::map<Key, RunResult> latest;
  for (const json& row : rows) {
    RunResult r;
    r.id = static_cast<int64_t>(num(row, "id"));
    r.created_at = str(row, "created_at");
    r.model = str(row, "model");
    r.model_hash = str(row, "model_hash");
    r.precision = str(row, "quant");
    if (r.precision.empty()) r.precision = "none";
    r.task = str(row, "task");
    r.method = str(row, "method");
    r.scoring = str(row, "scoring");
    r.split = str(row, "split");
    r.prompt_style = str(row, "prompt_style");
    r.metric = str(row, "metric");
    r.device = str(row, "device");
    r.version = str(row, "bioquant_version");
    r.shots = static_cast<int64_t>(num(row, "shots"));
    r.score = num(row, "score");
    r.ci_low = num(row, "ci_low", r.score);
    r.ci_high = num(row, "ci_high", r.score);
    r.n = static_cast<int64_t>(num(row, "n"));
    r.unparsed = static_cast<int64_t>(num(row, "unparsed"));
    r.seconds = num(row, "seconds");
    r.peak_rss_bytes = opt_num(row, "peak_rss_bytes");
    r.weight_bytes = opt_num(row, "weight_bytes");
    r.gpu_peak_bytes = opt_num(row, "gpu_peak_bytes");
    r.samples = str(row, "samples");
    const std::string result_text = str(row, "result_json");
    if (!result_text.empty()) {
      const json result = json::parse(result_text, nullptr, /*allow_exceptions=*/false);
      if (result.is_object()) {
        if (r.samples.empty() && result.contains("samples") && result["samples"].is_string())
          r.samples = result["samples"].get<std::string>();
        if (result.contains("labels") && result["labels"].is_array())
          for (const auto& l : result["labels"])
            if (l.is_string()) r.labels.push_back(l.get<std::string>());
      }
    }
    if (r.task.empty() || r.model.empty()) continue;
    const Key key{r.model, r.model_hash, r.precision, r.task, r.method, r.shots, r.scoring, r.split, r.prompt_style};
    auto it = latest.find(key);
    if (it == latest.end() || it->second.id < r.id) latest[key] = std::move(r);
  }
  // Short model names, made unique: the directory name, plus the fingerprint when two differ.
  std::map<std::string, std::set<std::string>> identities;  // base name -> model@hash
  for (const auto& [key, r] : latest) identities[base_name(r.model)].insert(r.model + "@" + r.model_hash);
  std::vector<RunResult> out;
  for (auto& [key, r] : latest) {
    const std::string base = base_name(r.model);
    r.model_name = identities[base].size() > 1 ? base + "@" + r.model_hash.substr(0, 8) : base;
    out.push_back(std::move(r));
  }
  std::stable_sort(out.begin(), out.end(), [](const RunResult& a, const RunResult& b) {
    return std::make_tuple(a.model_name, precision_rank(a.precision), a.precision, a.method, a.shots, a.scoring,
                           task_rank(a.task), a.task) <
           std::make_tuple(b.model_name, precision_rank(b.precision), b.precision, b.method, b.shots, b.scoring,
                           task_rank(b.task), b.task);
  });
  return out;
}

}  // namespace bioquant::report
