#include "bioquant/eval/metrics.h"

#include <algorithm>
#include <iterator>
#include <unordered_map>

#include "bioquant/core/error.h"

namespace bioquant::eval {

namespace {

constexpr MetricKind kKinds[] = {MetricKind::entity_f1, MetricKind::macro_f1, MetricKind::label_macro_f1,
                                 MetricKind::accuracy};

bool single_label(MetricKind kind) { return kind == MetricKind::macro_f1 || kind == MetricKind::accuracy; }

double ratio(int64_t num, int64_t den) { return den == 0 ? 0.0 : static_cast<double>(num) / static_cast<double>(den); }

// F1 = 2PR/(P+R) = 2tp/(2tp+fp+fn); 0 when tp+fp+fn == 0 (zero_division = 0).
double f1_of(int64_t tp, int64_t fp, int64_t fn) { return ratio(2 * tp, 2 * tp + fp + fn); }

ClassScore class_score(const std::string& label, int64_t tp, int64_t fp, int64_t fn) {
  ClassScore c;
  c.label = label;
  c.tp = tp;
  c.fp = fp;
  c.fn = fn;
  c.support = tp + fn;
  c.precision = ratio(tp, tp + fp);
  c.recall = ratio(tp, tp + fn);
  c.f1 = f1_of(tp, fp, fn);
  return c;
}

void check_sizes(const char* what, const std::vector<Gold>& gold, const std::vector<Prediction>& pred) {
  check(gold.size() == pred.size(), std::string(what) + ": " + std::to_string(gold.size()) + " gold examples but " +
                                        std::to_string(pred.size()) + " predictions");
}

std::vector<Span> span_set(const std::vector<Span>& spans) {
  std::vector<Span> s = spans;
  std::sort(s.begin(), s.end());
  s.erase(std::unique(s.begin(), s.end()), s.end());
  return s;
}

std::vector<std::string> label_set_of(const std::vector<std::string>& labels) {
  std::vector<std::string> s = labels;
  std::sort(s.begin(), s.end());
  s.erase(std::unique(s.begin(), s.end()), s.end());
  return s;
}

// Shape checks of a single-label example; returns the gold label.
const std::string& single_gold(const Gold& g, size_t i) {
  if (g.labels.size() != 1)
    throw Error("gold example " + std::to_string(i) + " has " + std::to_string(g.labels.size()) +
                " labels; a single-label task needs exactly one");
  return g.labels[0];
}

void check_single_pred(const Prediction& p, size_t i) {
  if (p.parsed && p.labels.size() != 1)
    throw Error("prediction " + std::to_string(i) + " is parsed but has " + std::to_string(p.labels.size()) +
                " labels; a single-label task needs exactly one");
}

bool example_correct(MetricKind kind, const Gold& g, const Prediction& p, size_t i) {
  switch (kind) {
    case MetricKind::entity_f1:
      return p.parsed && span_set(p.spans) == span_set(g.spans);
    case MetricKind::macro_f1:
    case MetricKind::accuracy: {
      const std::string& gl = single_gold(g, i);
      check_single_pred(p, i);
      return p.parsed && p.labels[0] == gl;
    }
    case MetricKind::label_macro_f1:
      return p.parsed && label_set_of(p.labels) == label_set_of(g.labels);
  }
  return false;
}

}  // namespace

MetricKind parse_metric_kind(std::string_view name) {
  for (MetricKind k : kKinds)
    if (metric_name(k) == name) return k;
  throw Error("unknown metric '" + std::string(name) + "' (valid: entity_f1, macro_f1, label_macro_f1, accuracy)");
}

std::string_view metric_name(MetricKind kind) {
  switch (kind) {
    case MetricKind::entity_f1: return "entity_f1";
    case MetricKind::macro_f1: return "macro_f1";
    case MetricKind::label_macro_f1: return "label_macro_f1";
    case MetricKind::accuracy: return "accuracy";
  }
  return "?";
}

// Sums over a multiset of examples.
struct MetricTable::Totals {
  int64_t n = 0, unparsed = 0, correct = 0;
  int64_t tp = 0, n_pred = 0, n_gold = 0;  // entity_f1
  std::vector<int64_t> ctp, cfp, cfn;      // per class
};

MetricTable::MetricTable(MetricKind kind, const std::vector<std::string>& label_set, const std::vector<Gold>& gold,
                         const std::vector<Prediction>& pred)
    : kind_(kind), n_(gold.size()) {
  const std::string name(metric_name(kind));
  check_sizes(name.c_str(), gold, pred);
  check(n_ > 0, name + ": no examples to score");

  // The class index of every label of the set (checked unique).
  std::unordered_map<std::string, int32_t> index;
  for (size_t c = 0; c < label_set.size(); ++c) {
    if (!index.emplace(label_set[c], static_cast<int32_t>(c)).second)
      throw Error(name + ": label '" + label_set[c] + "' appears twice in the label set");
  }
  if (kind == MetricKind::macro_f1 || kind == MetricKind::label_macro_f1)
    check(!label_set.empty(), name + " needs the task's label set (got none)");

  if (kind == MetricKind::entity_f1) {
    k_ = 1;
    labels_ = {label_set.size() == 1 ? label_set[0] : std::string("entity")};
  } else {
    k_ = label_set.size();
    labels_ = label_set;
  }
  classes_ = single_label(kind) && k_ > 0;

  correct_.resize(n_);
  unparsed_.resize(n_);
  if (kind == MetricKind::entity_f1) entity_.resize(3 * n_);
  if (classes_) {
    gold_class_.resize(n_);
    pred_class_.resize(n_);
  }
  if (kind == MetricKind::label_macro_f1) ml_offsets_.assign(n_ + 1, 0);

  std::vector<uint8_t> row;  // label_macro_f1 scratch
  for (size_t i = 0; i < n_; ++i) {
    const Gold& g = gold[i];
    const Prediction& p = pred[i];
    correct_[i] = example_correct(kind, g, p, i) ? 1 : 0;
    unparsed_[i] = p.parsed ? 0 : 1;
    switch (kind) {
      case MetricKind::entity_f1: {
        const std::vector<Span> gs = span_set(g.spans);
        std::vector<Span> ps;
        if (p.parsed) ps = span_set(p.spans);
        std::vector<Span> both;
        std::set_intersection(ps.begin(), ps.end(), gs.begin(), gs.end(), std::back_inserter(both));
        entity_[3 * i] = static_cast<int32_t>(both.size());
        entity_[3 * i + 1] = static_cast<int32_t>(ps.size());
        entity_[3 * i + 2] = static_cast<int32_t>(gs.size());
        break;
      }
      case MetricKind::macro_f1:
      case MetricKind::accuracy: {
        if (!classes_) break;  // accuracy without a label set: correctness is all there is
        const std::string& gl = g.labels[0];  // shape checked by example_correct
        auto gi = index.find(gl);
        if (gi == index.end())
          throw Error(name + ": gold label '" + gl + "' of example " + std::to_string(i) + " is not in the label set");
        gold_class_[i] = gi->second;
        pred_class_[i] = -1;
        if (p.parsed) {
          auto pi = index.find(p.labels[0]);
          if (pi != index.end()) {
            pred_class_[i] = pi->second;
          } else {
            unparsed_[i] = 1;  // maps to no valid label: wrong, reported as unparsed
          }
        }
        break;
      }
      case MetricKind::label_macro_f1: {
        row.assign(k_, 0);  // bit 0: gold has the label, bit 1: predicted
        for (const std::string& l : g.labels) {
          auto it = index.find(l);
          if (it == index.end())
            throw Error(name + ": gold label '" + l + "' of example " + std::to_string(i) + " is not in the label set");
          row[it->second] |= 1;
        }
        if (p.parsed) {
          for (const std::string& l : p.labels) {
            auto it = index.find(l);
            if (it != index.end()) row[it->second] |= 2;  // labels outside the set count for no label
          }
        }
        // Keep only the labels that count (tp, fp or fn): a replicate touches those alone.
        for (size_t c = 0; c < k_; ++c)
          if (row[c] != 0) ml_.push_back(static_cast<uint32_t>(c << 2) | row[c]);
        ml_offsets_[i + 1] = static_cast<uint32_t>(ml_.size());
        break;
      }
    }
  }
}

inline void MetricTable::accumulate(size_t i, Totals& t) const {
  t.n += 1;
  t.unparsed += unparsed_[i];
  t.correct += correct_[i];
  switch (kind_) {
    case MetricKind::entity_f1:
      t.tp += entity_[3 * i];
      t.n_pred += entity_[3 * i + 1];
      t.n_gold += entity_[3 * i + 2];
      break;
    case MetricKind::macro_f1:
    case MetricKind::accuracy:
      if (classes_) {
        const int32_t g = gold_class_[i], p = pred_class_[i];
        if (p == g) {
          t.ctp[g] += 1;
        } else {
          t.cfn[g] += 1;
          if (p >= 0) t.cfp[p] += 1;
        }
      }
      break;
    case MetricKind::label_macro_f1:
      for (uint32_t e = ml_offsets_[i]; e < ml_offsets_[i + 1]; ++e) {
        const uint32_t c = ml_[e] >> 2;
        switch (ml_[e] & 3) {
          case 3: t.ctp[c] += 1; break;
          case 2: t.cfp[c] += 1; break;
          default: t.cfn[c] += 1; break;
        }
      }
      break;
  }
}

MetricTable::Totals MetricTable::totals(std::span<const size_t> indices) const {
  Totals t;
  t.ctp.assign(k_, 0);
  t.cfp.assign(k_, 0);
  t.cfn.assign(k_, 0);
  for (size_t i : indices) {
    if (i >= n_)
      throw Error("example index " + std::to_string(i) + " out of range (" + std::to_string(n_) + " examples)");
    accumulate(i, t);
  }
  return t;
}

MetricTable::Totals MetricTable::totals_all() const {
  Totals t;
  t.ctp.assign(k_, 0);
  t.cfp.assign(k_, 0);
  t.cfn.assign(k_, 0);
  for (size_t i = 0; i < n_; ++i) accumulate(i, t);
  return t;
}

double MetricTable::finish_score(const Totals& t) const {
  switch (kind_) {
    case MetricKind::entity_f1:
      return f1_of(t.tp, t.n_pred - t.tp, t.n_gold - t.tp);
    case MetricKind::macro_f1:
    case MetricKind::label_macro_f1: {
      double sum = 0;
      for (size_t c = 0; c < k_; ++c) sum += f1_of(t.ctp[c], t.cfp[c], t.cfn[c]);
      return sum / static_cast<double>(k_);
    }
    case MetricKind::accuracy:
      return ratio(t.correct, t.n);
  }
  return 0;
}

MetricResult MetricTable::finish(const Totals& t) const {
  MetricResult r;
  r.kind = kind_;
  r.n = t.n;
  r.unparsed = t.unparsed;
  r.score = finish_score(t);
  switch (kind_) {
    case MetricKind::entity_f1:
      r.tp = t.tp;
      r.n_pred = t.n_pred;
      r.n_gold = t.n_gold;
      r.precision = ratio(t.tp, t.n_pred);
      r.recall = ratio(t.tp, t.n_gold);
      r.micro_f1 = r.score;
      r.per_class.push_back(class_score(labels_[0], t.tp, t.n_pred - t.tp, t.n_gold - t.tp));
      break;
    case MetricKind::macro_f1:
      r.macro_f1 = r.score;
      r.accuracy = ratio(t.correct, t.n);
      break;
    case MetricKind::accuracy:
      r.accuracy = r.score;
      if (classes_) {
        double sum = 0;
        for (size_t c = 0; c < k_; ++c) sum += f1_of(t.ctp[c], t.cfp[c], t.cfn[c]);
        r.macro_f1 = sum / static_cast<double>(k_);
      }
      break;
    case MetricKind::label_macro_f1: {
      int64_t tp = 0, fp = 0, fn = 0;
      for (size_t c = 0; c < k_; ++c) {
        tp += t.ctp[c];
        fp += t.cfp[c];
        fn += t.cfn[c];
      }
      r.precision = ratio(tp, tp + fp);
      r.recall = ratio(tp, tp + fn);
      r.micro_f1 = f1_of(tp, fp, fn);
      r.accuracy = ratio(t.correct, t.n);
      break;
    }
  }
  if (kind_ != MetricKind::entity_f1 && (classes_ || kind_ == MetricKind::label_macro_f1)) {
    r.per_class.reserve(k_);
    for (size_t c = 0; c < k_; ++c) r.per_class.push_back(class_score(labels_[c], t.ctp[c], t.cfp[c], t.cfn[c]));
  }
  return r;
}

MetricResult MetricTable::result() const { return finish(totals_all()); }

MetricResult MetricTable::result(std::span<const size_t> indices) const { return finish(totals(indices)); }

double MetricTable::score(std::span<const size_t> indices) const { return finish_score(totals(indices)); }

MetricResult compute_metric(MetricKind kind, const std::vector<std::string>& label_set, const std::vector<Gold>& gold,
                            const std::vector<Prediction>& pred) {
  return MetricTable(kind, label_set, gold, pred).result();
}

std::vector<bool> per_example_correct(MetricKind kind, const std::vector<Gold>& gold,
                                      const std::vector<Prediction>& pred) {
  check_sizes("per_example_correct", gold, pred);
  std::vector<bool> out(gold.size());
  for (size_t i = 0; i < gold.size(); ++i) out[i] = example_correct(kind, gold[i], pred[i], i);
  return out;
}

}  // namespace bioquant::eval
