#include "bioquant/eval/scoring.h"

#include <algorithm>
#include <cmath>
#include <set>

#include "bioquant/core/error.h"
#include "bioquant/eval/stats.h"

namespace bioquant::eval {

using nlohmann::json;

std::vector<std::string> metric_labels(const TaskSpec& task, const std::vector<Example>& examples) {
  if (task.family == TaskFamily::ner) return {task.entity_class};
  if (!task.labels.empty()) return task.labels;
  std::vector<std::string> letters;  // multiple choice: every option letter seen, in order
  for (const auto& ex : examples)
    for (const auto& l : ex.option_letters)
      if (std::find(letters.begin(), letters.end(), l) == letters.end()) letters.push_back(l);
  std::sort(letters.begin(), letters.end());
  return letters;
}

ParseContext parse_context(const TaskSpec& task, const Example& ex, bool chain_of_thought) {
  ParseContext ctx;
  ctx.chain_of_thought = chain_of_thought;
  ctx.aliases = task.aliases;
  if (task.family == TaskFamily::ner) {
    ctx.tokens = ex.tokens;
  } else if (task.family == TaskFamily::qa && !ex.option_letters.empty()) {
    ctx.labels = ex.option_letters;
    ctx.option_texts = ex.option_texts;
  } else {
    ctx.labels = task.labels;
  }
  return ctx;
}

Prediction parse_example_output(const TaskSpec& task, const Example& ex, const std::string& output,
                                bool chain_of_thought) {
  return parse_output(task.family, output, parse_context(task, ex, chain_of_thought));
}

namespace {

json spans_json(const Example& ex, const std::vector<Span>& spans, json& entities) {
  json out = json::array();
  entities = json::array();
  for (const Span& s : spans) {
    out.push_back({s.begin, s.end});
    std::string text;
    for (int32_t i = s.begin; i < s.end && i < static_cast<int32_t>(ex.tokens.size()); ++i) {
      if (!text.empty()) text += ' ';
      text += ex.tokens[static_cast<size_t>(i)];
    }
    entities.push_back(text);
  }
  return out;
}

std::vector<Span> spans_from_json(const json& j) {
  std::vector<Span> out;
  check(j.is_array(), "\"spans\" must be an array of [begin, end]");
  for (const auto& s : j) {
    check(s.is_array() && s.size() == 2 && s[0].is_number_integer() && s[1].is_number_integer(),
          "\"spans\" must be an array of [begin, end]");
    out.push_back({s[0].get<int32_t>(), s[1].get<int32_t>()});
  }
  return out;
}

std::vector<std::string> labels_from_json(const json& j) {
  std::vector<std::string> out;
  check(j.is_array(), "\"labels\" must be an array of strings");
  for (const auto& l : j) {
    check(l.is_string(), "\"labels\" must be an array of strings");
    out.push_back(l.get<std::string>());
  }
  return out;
}

void put_if_number(json& out, const char* key, double v) {
  if (!std::isnan(v)) out[key] = v;
}

}  // namespace

json gold_to_json(const TaskSpec& task, const Example& ex) {
  if (task.family == TaskFamily::ner) {
    json entities;
    json spans = spans_json(ex, ex.gold.spans, entities);
    return {{"spans", spans}, {"entities", entities}};
  }
  return {{"labels", ex.gold.labels}};
}

json prediction_to_json(const TaskSpec& task, const Example& ex, const Prediction& pred) {
  json out = {{"parsed", pred.parsed}};
  if (task.family == TaskFamily::ner) {
    json entities;
    out["spans"] = spans_json(ex, pred.spans, entities);
    out["entities"] = entities;
  } else {
    out["labels"] = pred.labels;
  }
  return out;
}

Gold gold_from_json(const json& j) {
  check(j.is_object(), "\"gold\" must be an object");
  Gold g;
  if (j.contains("spans")) g.spans = spans_from_json(j["spans"]);
  if (j.contains("labels")) g.labels = labels_from_json(j["labels"]);
  return g;
}

Prediction prediction_from_json(const json& j) {
  check(j.is_object() && j.contains("parsed") && j["parsed"].is_boolean(),
        "\"parsed\" must be an object with a boolean \"parsed\"");
  Prediction p;
  p.parsed = j["parsed"].get<bool>();
  if (j.contains("spans")) p.spans = spans_from_json(j["spans"]);
  if (j.contains("labels")) p.labels = labels_from_json(j["labels"]);
  return p;
}

json score_summary(const TaskSpec& task, const std::string& split, const std::vector<std::string>& labels,
                   const std::vector<Gold>& gold, const std::vector<Prediction>& pred, const ScoreOptions& options) {
  const MetricKind kind = parse_metric_kind(task.metric);
  const MetricResult m = compute_metric(kind, labels, gold, pred);
  const Interval ci = metric_ci(kind, labels, gold, pred, options.replicates, options.seed);
  json out = {{"task", task.name},
              {"split", split},
              {"n", m.n},
              {"metric", std::string(metric_name(kind))},
              {"labels", labels},
              {"score", m.score},
              {"ci95", {ci.low, ci.high}},
              {"unparsed", m.unparsed}};
  put_if_number(out, "accuracy", m.accuracy);
  put_if_number(out, "precision", m.precision);
  put_if_number(out, "recall", m.recall);
  put_if_number(out, "micro_f1", m.micro_f1);
  put_if_number(out, "macro_f1", m.macro_f1);
  if (kind == MetricKind::entity_f1) {
    out["tp"] = m.tp;
    out["predicted"] = m.n_pred;
    out["gold"] = m.n_gold;
  }
  json per_class = json::array();
  for (const auto& c : m.per_class)
    per_class.push_back({{"label", c.label}, {"precision", c.precision}, {"recall", c.recall}, {"f1", c.f1},
                         {"tp", c.tp}, {"fp", c.fp}, {"fn", c.fn}, {"support", c.support}});
  out["per_class"] = per_class;
  out["bootstrap"] = {{"replicates", options.replicates}, {"seed", options.seed}, {"level", 0.95}};
  return out;
}

}  // namespace bioquant::eval
