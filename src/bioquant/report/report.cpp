#include "bioquant/report/report.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <thread>

#include "bioquant/core/atomic_file.h"
#include "bioquant/core/error.h"
#include "bioquant/eval/scoring.h"
#include "bioquant/eval/stats.h"
#include "bioquant/eval/task.h"
#include "bioquant/report/estimate.h"

namespace bioquant::report {

using nlohmann::json;
namespace fs = std::filesystem;

// ---------------------------------------------------------------- tables

std::string html_escape(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (char ch : s) {
    switch (ch) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&#39;"; break;
      default: out += ch;
    }
  }
  return out;
}

std::string to_markdown(const Table& t) {
  auto cell = [](std::string s) {
    std::string out;
    for (char ch : s) {
      if (ch == '|') out += "\\|";
      else if (ch == '\n') out += ' ';
      else out += ch;
    }
    return out.empty() ? std::string(" ") : out;
  };
  std::string s;
  if (!t.title.empty()) s += "### " + t.title + "\n\n";
  s += "|";
  for (const auto& c : t.columns) s.append(" ").append(cell(c.header)).append(" |");
  s += "\n|";
  for (const auto& c : t.columns) s += c.numeric ? " ---: |" : " --- |";
  s += "\n";
  for (const auto& row : t.rows) {
    s += "|";
    for (const auto& v : row) s.append(" ").append(cell(v)).append(" |");
    s += "\n";
  }
  return s;
}

std::string to_csv(const Table& t) {
  auto cell = [](const std::string& v) {
    if (v.find_first_of(",\"\n\r") == std::string::npos) return v;
    std::string out = "\"";
    for (char ch : v) out += ch == '"' ? std::string("\"\"") : std::string(1, ch);
    return out + "\"";
  };
  std::string s;
  for (size_t i = 0; i < t.columns.size(); ++i) s.append(i ? "," : "").append(cell(t.columns[i].header));
  s += "\r\n";
  for (const auto& row : t.rows) {
    for (size_t i = 0; i < row.size(); ++i) s.append(i ? "," : "").append(cell(row[i]));
    s += "\r\n";
  }
  return s;
}

std::string to_html(const Table& t) {
  std::string s = "<table>";
  if (!t.title.empty()) s += "<caption>" + html_escape(t.title) + "</caption>";
  s += "<thead><tr>";
  for (const auto& c : t.columns) s += std::string(c.numeric ? "<th class=\"num\">" : "<th>") + html_escape(c.header) + "</th>";
  s += "</tr></thead><tbody>";
  for (const auto& row : t.rows) {
    s += "<tr>";
    for (size_t i = 0; i < row.size(); ++i)
      s += std::string(t.columns[i].numeric ? "<td class=\"num\">" : "<td>") + html_escape(row[i]) + "</td>";
    s += "</tr>";
  }
  return s + "</tbody></table>\n";
}

// ---------------------------------------------------------------- comparisons

namespace {

std::string fixed(double v, int digits = 4) {
  if (!std::isfinite(v)) return "";
  char buf[48];
  std::snprintf(buf, sizeof buf, "%.*f", digits, v);
  return buf;
}
std::string signed_fixed(double v, int digits = 4) {
  char buf[48];
  std::snprintf(buf, sizeof buf, "%+.*f", digits, v);
  return buf;
}
double mib(double bytes) { return bytes / (1024.0 * 1024.0); }

// The split when it is not the task's default ("" when it is).
std::string split_tag(const RunResult& r) {
  try {
    if (r.split.empty() || r.split == eval::find_task(r.task).default_split) return "";
  } catch (const Error&) {
  }
  return r.split;
}

// Everything that makes two results comparable, the precision aside.
std::string setting_key(const RunResult& r) {
  return r.method + "|" + std::to_string(r.shots) + "|" + r.scoring + "|" + split_tag(r) + "|" + r.prompt_style;
}

std::string setting_label(const RunResult& r) {
  std::string s = r.method;
  if (r.method.rfind("few-shot", 0) == 0) s += " (" + std::to_string(r.shots) + (r.shots == 1 ? " shot)" : " shots)");
  if (!r.scoring.empty() && r.scoring != "generate") s += ", " + r.scoring;
  if (!r.prompt_style.empty() && r.prompt_style != "bioquant") s += ", " + r.prompt_style + " prompt";
  if (!split_tag(r).empty()) s += ", split " + split_tag(r);
  return s;
}

int baseline_preference(const std::string& p) {
  if (p == "bf16") return 0;
  if (p == "f16") return 1;
  if (p == "none") return 2;
  if (p == "f32") return 3;
  return 100;
}

}  // namespace

std::vector<Comparison> compare_with_16bit(const std::vector<RunResult>& results, int bootstrap, uint64_t seed) {
  // The baseline precision of each (model, setting): the most preferred 16-bit one present.
  std::map<std::string, std::string> baseline;  // model|setting -> precision
  for (const auto& r : results) {
    if (baseline_preference(r.precision) >= 100) continue;
    const std::string key = r.model + "@" + r.model_hash + "|" + setting_key(r);
    auto it = baseline.find(key);
    if (it == baseline.end() || baseline_preference(r.precision) < baseline_preference(it->second))
      baseline[key] = r.precision;
  }
  SampleFiles samples;
  std::vector<Comparison> out;
  for (const auto& r : results) {
    const std::string key = r.model + "@" + r.model_hash + "|" + setting_key(r);
    auto b = baseline.find(key);
    if (b == baseline.end() || b->second == r.precision) continue;
    const RunResult* base = nullptr;
    for (const auto& x : results)
      if (x.model == r.model && x.model_hash == r.model_hash && x.precision == b->second && x.task == r.task &&
          setting_key(x) == setting_key(r))
        base = &x;
    if (base == nullptr) continue;
    Comparison c;
    c.base = base;
    c.run = &r;
    c.delta = r.score - base->score;
    const auto& sa = samples.get(base->samples);
    const auto& sb = samples.get(r.samples);
    bool paired = false;
    if (sa && sb) {
      try {
        const PairedSamples shared = pair_samples(*sa, *sb);
        if (!shared.gold.empty()) {
          const auto kind = eval::parse_metric_kind(r.metric);
          const auto p = eval::compare_paired(kind, base->labels, shared.gold, shared.a, shared.b, bootstrap, seed);
          c.ci_low = p.ci.low;
          c.ci_high = p.ci.high;
          c.p_value = p.p_value;
          c.delta = p.diff;
          c.shared_examples = p.n;
          // A percentile interval from a handful of examples means nothing: below kMinPairedExamples shared
          // examples a change is reported but never called significant.
          c.significant = p.n >= kMinPairedExamples && (p.ci.low > 0 || p.ci.high < 0);
          c.test = p.n >= kMinPairedExamples ? "paired bootstrap" : "paired bootstrap (too few examples)";
          if (p.n >= kMinPairedExamples) c.paired = eval::PairedTask{kind, base->labels, shared.gold, shared.a, shared.b};
          paired = true;
        }
      } catch (const std::exception&) {
        paired = false;  // unreadable samples: fall back to the CI test below
      }
    }
    if (!paired) {
      c.shared_examples = std::min(r.n, base->n);
      c.test = c.shared_examples >= kMinPairedExamples ? "CI overlap" : "CI overlap (too few examples)";
      c.significant = c.shared_examples >= kMinPairedExamples && (r.ci_low > base->ci_high || r.ci_high < base->ci_low);
    }
    out.push_back(c);
  }
  return out;
}

// ---------------------------------------------------------------- charts

std::string precision_color(const std::string& p) {
  static const std::map<std::string, std::string> colors = {
      {"f32", "#555555"},  {"bf16", "#1f77b4"},   {"f16", "#17becf"},  {"none", "#1f77b4"}, {"int8", "#ff7f0e"},
      {"q8_0", "#2ca02c"}, {"q6_k", "#8c564b"},   {"q5_k", "#bcbd22"}, {"q4_k_m", "#9467bd"}, {"q4_k", "#9467bd"},
      {"q4_0", "#e377c2"}, {"nf4", "#d62728"},    {"nf4+dq", "#a01c1c"}, {"fp4", "#7f7f7f"}, {"fp4+dq", "#5a5a5a"}};
  auto it = colors.find(p);
  if (it != colors.end()) return it->second;
  // Other names: a stable colour from the name.
  unsigned h = 2166136261u;
  for (char ch : p) h = (h ^ static_cast<unsigned char>(ch)) * 16777619u;
  char buf[8];
  std::snprintf(buf, sizeof buf, "#%02x%02x%02x", 60 + h % 150, 60 + (h >> 8) % 150, 60 + (h >> 16) % 150);
  return buf;
}

namespace {

// Small helper to write SVG with escaped text.
class Svg {
 public:
  Svg(double w, double h, const std::string& label) : w_(w), h_(h), label_(label) {}
  void rect(double x, double y, double w, double h, const std::string& fill, const std::string& extra = "") {
    add("<rect x=\"" + n(x) + "\" y=\"" + n(y) + "\" width=\"" + n(std::max(0.0, w)) + "\" height=\"" +
        n(std::max(0.0, h)) + "\" fill=\"" + fill + "\"" + extra + "/>");
  }
  void line(double x1, double y1, double x2, double y2, const std::string& stroke, double width = 1,
            const std::string& extra = "") {
    add("<line x1=\"" + n(x1) + "\" y1=\"" + n(y1) + "\" x2=\"" + n(x2) + "\" y2=\"" + n(y2) + "\" stroke=\"" + stroke +
        "\" stroke-width=\"" + n(width) + "\"" + extra + "/>");
  }
  void text(double x, double y, const std::string& t, const std::string& anchor = "start", double size = 11,
            const std::string& extra = "") {
    add("<text x=\"" + n(x) + "\" y=\"" + n(y) + "\" font-size=\"" + n(size) + "\" text-anchor=\"" + anchor + "\"" +
        extra + ">" + html_escape(t) + "</text>");
  }
  void circle(double x, double y, double r, const std::string& fill, const std::string& title,
              const std::string& extra = "") {
    add("<circle cx=\"" + n(x) + "\" cy=\"" + n(y) + "\" r=\"" + n(r) + "\" fill=\"" + fill + "\"" + extra + "><title>" +
        html_escape(title) + "</title></circle>");
  }
  void raw(const std::string& s) { add(s); }
  std::string str() const {
    return "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" + n(w_) + "\" height=\"" + n(h_) + "\" viewBox=\"0 0 " +
           n(w_) + " " + n(h_) + "\" role=\"img\" aria-label=\"" + html_escape(label_) + "\">" + body_ + "</svg>";
  }
  static std::string n(double v) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.1f", v);
    return buf;
  }

 private:
  void add(const std::string& s) { body_ += s; }
  double w_, h_;
  std::string label_;
  std::string body_;
};

// About `count` round tick values covering [lo, hi].
std::vector<double> nice_ticks(double lo, double hi, int count) {
  if (!(hi > lo)) hi = lo + 1;
  const double raw = (hi - lo) / std::max(1, count);
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  double step = mag;
  for (double m : {1.0, 2.0, 2.5, 5.0, 10.0})
    if (raw <= m * mag) {
      step = m * mag;
      break;
    }
  std::vector<double> ticks;
  for (double v = std::ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push_back(v);
  return ticks;
}

std::string tick_label(double v) {
  char buf[32];
  if (std::fabs(v) >= 100 || std::fabs(v - std::round(v)) < 1e-9) std::snprintf(buf, sizeof buf, "%.0f", v);
  else if (std::fabs(v * 10 - std::round(v * 10)) < 1e-9) std::snprintf(buf, sizeof buf, "%.1f", v);
  else std::snprintf(buf, sizeof buf, "%.2f", v);
  return buf;
}

struct Point {
  double memory, score;
  std::string label, precision;
};

// Score vs. memory of one task, the Pareto front (no other point has less memory and a higher
// score) drawn as a step line through its points.
std::string scatter_pareto(const std::string& task, const std::vector<Point>& points, bool gib) {
  const double W = 330, H = 240, L = 48, R = 12, T = 26, B = 40;
  Svg svg(W, H, "score vs peak memory, " + task);
  svg.rect(0, 0, W, H, "#ffffff");
  svg.text(L, 16, task, "start", 13, " font-weight=\"600\"");
  const double unit = gib ? 1024.0 * 1024.0 * 1024.0 : 1024.0 * 1024.0;
  double xmin = 1e300, xmax = 0;
  for (const auto& p : points) {
    xmin = std::min(xmin, p.memory / unit);
    xmax = std::max(xmax, p.memory / unit);
  }
  const double span = std::max(xmax - xmin, std::max(xmax * 0.05, 1e-6));
  xmin = std::max(0.0, xmin - span * 0.15);
  xmax = xmax + span * 0.15;
  double ymax = 0;
  for (const auto& p : points) ymax = std::max(ymax, p.score);
  ymax = ymax <= 0 ? 1.0 : std::min(1.0, std::max(0.1, std::ceil(ymax * 1.15 * 10) / 10));
  auto X = [&](double v) { return L + (v - xmin) / (xmax - xmin) * (W - L - R); };
  auto Y = [&](double v) { return T + (1 - v / ymax) * (H - T - B); };
  for (double t : nice_ticks(0, ymax, 4)) {
    svg.line(L, Y(t), W - R, Y(t), "#e5e5e5");
    svg.text(L - 5, Y(t) + 4, tick_label(t), "end", 10);
  }
  for (double t : nice_ticks(xmin, xmax, 4)) {
    if (X(t) < L - 0.5 || X(t) > W - R + 0.5) continue;
    svg.line(X(t), H - B, X(t), H - B + 4, "#444");
    svg.text(X(t), H - B + 15, tick_label(t), "middle", 10);
  }
  svg.line(L, H - B, W - R, H - B, "#444");
  svg.line(L, T, L, H - B, "#444");
  svg.text((L + W - R) / 2, H - 6, std::string("peak memory (") + (gib ? "GiB" : "MiB") + ")", "middle", 10);
  svg.text(12, (T + H - B) / 2, "score", "middle", 10,
           " transform=\"rotate(-90 12 " + Svg::n((T + H - B) / 2) + ")\"");
  // Pareto front.
  std::vector<Point> sorted = points;
  std::sort(sorted.begin(), sorted.end(), [](const Point& a, const Point& b) {
    return a.memory != b.memory ? a.memory < b.memory : a.score > b.score;
  });
  std::vector<Point> front;
  for (const auto& p : sorted)
    if (front.empty() || p.score > front.back().score) front.push_back(p);
  if (!front.empty()) {
    std::string path = "M" + Svg::n(X(front[0].memory / unit)) + " " + Svg::n(Y(front[0].score));
    for (size_t i = 1; i < front.size(); ++i)
      path += " H" + Svg::n(X(front[i].memory / unit)) + " V" + Svg::n(Y(front[i].score));
    path += " H" + Svg::n(W - R);
    svg.raw("<path d=\"" + path + "\" fill=\"none\" stroke=\"#333\" stroke-width=\"1.5\" stroke-dasharray=\"4 3\"/>");
  }
  for (const auto& p : points) {
    bool on_front = false;
    for (const auto& f : front) on_front |= f.label == p.label;
    svg.circle(X(p.memory / unit), Y(p.score), on_front ? 6 : 5, precision_color(p.precision),
               p.label + ": score " + fixed(p.score) + ", peak " + fixed(p.memory / unit, 2) + (gib ? " GiB" : " MiB") +
                   (on_front ? " (Pareto front)" : ""),
               on_front ? " stroke=\"#000\" stroke-width=\"1.5\"" : " stroke=\"#fff\" stroke-width=\"1\"");
  }
  return svg.str();
}

std::string legend(const std::vector<std::string>& precisions) {
  double w = 10;
  for (const auto& p : precisions) w += 30 + 7.0 * static_cast<double>(p.size());
  Svg svg(std::max(w, 120.0), 22, "legend: colours by precision");
  double x = 4;
  for (const auto& p : precisions) {
    svg.rect(x, 5, 12, 12, precision_color(p));
    svg.text(x + 16, 15, precision_label(p));
    x += 30 + 7.0 * static_cast<double>(p.size());
  }
  return svg.str();
}

// Per-task bars, one per precision, with 95% CI error bars.
std::string bars_with_ci(const std::string& title, const std::vector<std::string>& tasks,
                         const std::vector<std::string>& precisions,
                         const std::map<std::pair<std::string, std::string>, const RunResult*>& cell) {
  const double bar = 14, gap = 18, L = 44, T = 26, B = 70, H = 290;
  const double group = bar * static_cast<double>(precisions.size()) + gap;
  const double W = L + group * static_cast<double>(tasks.size()) + 12;
  Svg svg(W, H, title);
  svg.rect(0, 0, W, H, "#ffffff");
  svg.text(L, 16, title, "start", 13, " font-weight=\"600\"");
  auto Y = [&](double v) { return T + (1 - v) * (H - T - B); };
  for (double t : nice_ticks(0, 1, 5)) {
    svg.line(L, Y(t), W - 8, Y(t), "#e5e5e5");
    svg.text(L - 5, Y(t) + 4, tick_label(t), "end", 10);
  }
  svg.line(L, H - B, W - 8, H - B, "#444");
  for (size_t ti = 0; ti < tasks.size(); ++ti) {
    const double gx = L + gap / 2 + group * static_cast<double>(ti);
    for (size_t pi = 0; pi < precisions.size(); ++pi) {
      auto it = cell.find({tasks[ti], precisions[pi]});
      if (it == cell.end()) continue;
      const RunResult& r = *it->second;
      const double x = gx + bar * static_cast<double>(pi);
      svg.raw("<g><title>" +
              html_escape(r.task + ", " + precision_label(r.precision) + ": " + r.metric + " " +
                          fixed(r.score) + " [" + fixed(r.ci_low) + ", " + fixed(r.ci_high) + "], n " +
                          std::to_string(r.n)) +
              "</title>");
      svg.rect(x + 1, Y(std::max(0.0, r.score)), bar - 2, Y(0) - Y(std::max(0.0, r.score)), precision_color(r.precision));
      const double cx = x + bar / 2;
      svg.line(cx, Y(r.ci_low), cx, Y(r.ci_high), "#111", 1.2);
      svg.line(cx - 3, Y(r.ci_low), cx + 3, Y(r.ci_low), "#111", 1.2);
      svg.line(cx - 3, Y(r.ci_high), cx + 3, Y(r.ci_high), "#111", 1.2);
      svg.raw("</g>");
    }
    const double lx = gx + group / 2 - gap / 2, ly = H - B + 10;
    svg.text(lx, ly, tasks[ti], "end", 10, " transform=\"rotate(-35 " + Svg::n(lx) + " " + Svg::n(ly) + ")\"");
  }
  return svg.str();
}

// Score change versus 16-bit, precision x task.
std::string heatmap(const std::string& title, const std::string& base_precision, const std::vector<std::string>& tasks,
                    const std::vector<std::string>& precisions,
                    const std::map<std::pair<std::string, std::string>, const Comparison*>& cell) {
  const double cw = 92, ch = 30, L = 70, T = 96;
  const double W = L + cw * static_cast<double>(tasks.size()) + 10;
  const double H = T + ch * static_cast<double>(precisions.size()) + 14;
  Svg svg(W, H, title);
  svg.rect(0, 0, W, H, "#ffffff");
  svg.text(4, 16, title, "start", 13, " font-weight=\"600\"");
  double range = 0.05;
  for (const auto& [k, c] : cell) range = std::max(range, std::fabs(c->delta));
  for (size_t ti = 0; ti < tasks.size(); ++ti) {
    const double x = L + cw * static_cast<double>(ti) + cw / 2, y = T - 8;
    svg.text(x, y, tasks[ti], "start", 10, " transform=\"rotate(-35 " + Svg::n(x) + " " + Svg::n(y) + ")\"");
  }
  for (size_t pi = 0; pi < precisions.size(); ++pi) {
    const double y = T + ch * static_cast<double>(pi);
    svg.text(L - 6, y + ch / 2 + 4, precisions[pi] + " − " + (base_precision == "none" ? "stored" : base_precision), "end",
             10);
    for (size_t ti = 0; ti < tasks.size(); ++ti) {
      const double x = L + cw * static_cast<double>(ti);
      auto it = cell.find({tasks[ti], precisions[pi]});
      if (it == cell.end()) {
        svg.rect(x + 1, y + 1, cw - 2, ch - 2, "#f0f0f0");
        svg.text(x + cw / 2, y + ch / 2 + 4, "–", "middle", 11, " fill=\"#999\"");
        continue;
      }
      const Comparison& c = *it->second;
      const double t = std::clamp(c.delta / range, -1.0, 1.0);
      // Diverging: red for a drop, blue for a gain, white at 0.
      const int r = t < 0 ? 255 : static_cast<int>(255 - 180 * t), g = static_cast<int>(255 - 170 * std::fabs(t)),
                b = t > 0 ? 255 : static_cast<int>(255 + 180 * t);
      char fill[8];
      std::snprintf(fill, sizeof fill, "#%02x%02x%02x", std::clamp(r, 0, 255), std::clamp(g, 0, 255), std::clamp(b, 0, 255));
      std::string title_text = c.run->task + ", " + c.run->precision + ": " + signed_fixed(c.delta) + " vs " +
                               (c.base->precision == "none" ? "stored" : c.base->precision) + " (" + c.test;
      if (c.p_value) title_text += ", 95% CI [" + fixed(*c.ci_low) + ", " + fixed(*c.ci_high) + "], p " + fixed(*c.p_value, 3);
      title_text += std::string(c.significant ? ", significant" : ", not significant") + ")";
      svg.raw("<g><title>" + html_escape(title_text) + "</title>");
      svg.rect(x + 1, y + 1, cw - 2, ch - 2, fill,
               c.significant ? " stroke=\"#000\" stroke-width=\"2.5\"" : " stroke=\"#ccc\" stroke-width=\"1\"");
      const std::string mark = c.significant ? (c.test.rfind("paired bootstrap", 0) == 0 ? "*" : "†") : "";
      svg.text(x + cw / 2, y + ch / 2 + 4, signed_fixed(c.delta, 3) + mark, "middle", 11,
               c.significant ? " font-weight=\"700\"" : "");
      svg.raw("</g>");
    }
  }
  return svg.str();
}

struct MemoryRow {
  std::string model_name, precision;
  std::optional<double> peak, weights;
  std::optional<double> gpu_peak;  // runs on a GPU: the card's peak use
  size_t results = 0;
  // The memory the pair needs where it ran: the card's for runs on a GPU, else the host's.
  std::optional<double> shown() const { return gpu_peak ? gpu_peak : peak; }
};

std::string memory_bars(const std::vector<MemoryRow>& rows) {
  const double L = 190, R = 90, bar = 18, gap = 8, T = 28;
  double maxv = 0;
  for (const auto& r : rows) maxv = std::max({maxv, r.shown().value_or(0), r.weights.value_or(0)});
  const bool gib = maxv >= 2.0 * 1024 * 1024 * 1024;
  const double unit = gib ? 1024.0 * 1024.0 * 1024.0 : 1024.0 * 1024.0;
  const double W = 760, H = T + (bar + gap) * static_cast<double>(rows.size()) + 40;
  Svg svg(W, H, "peak memory by precision");
  svg.rect(0, 0, W, H, "#ffffff");
  svg.text(4, 16, "Peak memory by model and precision (GPU: the card's, else RSS); inner bar: weights", "start", 13,
           " font-weight=\"600\"");
  const double xmax = maxv > 0 ? maxv / unit * 1.05 : 1;
  auto X = [&](double v) { return L + v / xmax * (W - L - R); };
  const double bottom = T + (bar + gap) * static_cast<double>(rows.size());
  for (double t : nice_ticks(0, xmax, 5)) {
    svg.line(X(t), T - 4, X(t), bottom, "#e5e5e5");
    svg.text(X(t), bottom + 14, tick_label(t), "middle", 10);
  }
  svg.text((L + W - R) / 2, bottom + 30, gib ? "GiB" : "MiB", "middle", 10);
  for (size_t i = 0; i < rows.size(); ++i) {
    const auto& r = rows[i];
    const double y = T + (bar + gap) * static_cast<double>(i);
    svg.text(L - 6, y + bar / 2 + 4, r.model_name + " " + precision_label(r.precision), "end", 11);
    if (const std::optional<double> peak = r.shown()) {
      svg.raw("<g><title>" + html_escape(r.model_name + " " + r.precision + ": peak " + format_bytes(*peak) +
                                         (r.gpu_peak ? " (GPU)" : " (RSS)") +
                                         (r.weights ? ", weights " + format_bytes(*r.weights) : "")) +
              "</title>");
      svg.rect(L, y, X(*peak / unit) - L, bar, precision_color(r.precision), " fill-opacity=\"0.55\"");
      if (r.weights) svg.rect(L, y + 4, X(*r.weights / unit) - L, bar - 8, precision_color(r.precision));
      svg.text(X(*peak / unit) + 4, y + bar / 2 + 4, fixed(*peak / unit, gib ? 2 : 1) + (r.gpu_peak ? " GPU" : ""),
               "start", 10);
      svg.raw("</g>");
    } else {
      svg.text(L + 4, y + bar / 2 + 4, "not measured", "start", 10, " fill=\"#999\"");
    }
  }
  return svg.str();
}

std::string cpu_name() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      const size_t colon = line.find(':');
      if (colon != std::string::npos) return line.substr(line.find_first_not_of(" \t", colon + 1));
    }
  }
  return "unknown CPU";
}

std::string utc_now() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M UTC", &tm);
  return buf;
}

const char* kCss = R"(body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px}.stamp{color:#555;font-size:12px}.grid{display:flex;flex-wrap:wrap;gap:10px}
.grid svg,.chart svg{background:#fff;border:1px solid #e3e3e3}.note{font-size:12px;color:#555;max-width:1100px}
table{border-collapse:collapse;font-size:12px;margin:8px 0 16px;background:#fff}caption{text-align:left;font-weight:600;padding:4px 0}
th,td{border:1px solid #ddd;padding:3px 7px}th{background:#f1f1f1}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
)";

}  // namespace

std::vector<MeanComparison> mean_changes_vs_16bit(const std::vector<Comparison>& comparisons, int bootstrap,
                                                  uint64_t seed) {
  std::map<std::string, std::vector<const Comparison*>> groups;  // model|setting|precision -> by task name
  std::vector<std::string> order;
  for (const auto& c : comparisons) {
    const std::string key = c.run->model + "@" + c.run->model_hash + "|" + setting_key(*c.run) + "|" + c.run->precision;
    if (!groups.count(key)) order.push_back(key);
    groups[key].push_back(&c);
  }
  std::vector<MeanComparison> out;
  for (const auto& key : order) {
    std::vector<const Comparison*> group = groups[key];
    std::sort(group.begin(), group.end(), [](const Comparison* a, const Comparison* b) { return a->run->task < b->run->task; });
    MeanComparison m;
    m.run = group.front()->run;
    m.base = group.front()->base;
    std::vector<eval::PairedTask> paired;
    std::vector<std::string> unpaired;
    for (const Comparison* c : group) {
      m.tasks.push_back(c->run->task);
      m.base_mean += c->base->score;
      m.mean += c->run->score;
      if (c->paired) paired.push_back(*c->paired);
      else unpaired.push_back(c->run->task);
    }
    const double count = static_cast<double>(group.size());
    m.base_mean /= count;
    m.mean /= count;
    m.delta = m.mean - m.base_mean;
    if (unpaired.empty()) {
      m.paired = eval::compare_paired_mean(paired, bootstrap, seed);
      m.delta = m.paired->diff;
      m.significant = m.paired->ci.low > 0 || m.paired->ci.high < 0;
      m.test = "paired bootstrap, stratified by task";
    } else {
      std::string list;
      for (const auto& t : unpaired) list += (list.empty() ? "" : ", ") + t;
      m.test = "not tested: no paired samples for " + list;
    }
    out.push_back(std::move(m));
  }
  return out;
}

// ---------------------------------------------------------------- the report

ReportSummary write_report(const std::vector<json>& rows, const ReportOptions& o) {
  const std::vector<RunResult> results = latest_results(rows);
  check(!results.empty(), "the results database holds no runs (run bioquant sweep or eval first)");
  const std::vector<Comparison> comparisons = compare_with_16bit(results, o.bootstrap, o.seed);
  ReportSummary summary;
  summary.results = results.size();
  summary.comparisons = comparisons.size();
  for (const auto& c : comparisons) {
    (c.test.rfind("paired bootstrap", 0) == 0 ? summary.paired : summary.ci_based) += 1;
    summary.significant += c.significant ? 1 : 0;
  }

  // Orders: tasks (study order), precisions (by rank), models, settings.
  std::vector<std::string> tasks, precisions, models;
  std::vector<std::pair<std::string, std::string>> settings;  // key, label
  for (const auto& r : results) {
    if (std::find(tasks.begin(), tasks.end(), r.task) == tasks.end()) tasks.push_back(r.task);
    if (std::find(precisions.begin(), precisions.end(), r.precision) == precisions.end()) precisions.push_back(r.precision);
    if (std::find(models.begin(), models.end(), r.model_name) == models.end()) models.push_back(r.model_name);
    const auto s = std::make_pair(setting_key(r), setting_label(r));
    if (std::find(settings.begin(), settings.end(), s) == settings.end()) settings.push_back(s);
  }
  auto task_index = [](const std::string& t) {
    const auto& all = eval::all_tasks();
    for (size_t i = 0; i < all.size(); ++i)
      if (all[i].name == t) return static_cast<int>(i);
    return 1000;
  };
  std::stable_sort(tasks.begin(), tasks.end(), [&](const auto& a, const auto& b) { return task_index(a) < task_index(b); });
  std::stable_sort(precisions.begin(), precisions.end(),
                   [](const auto& a, const auto& b) { return precision_rank(a) < precision_rank(b); });
  std::sort(settings.begin(), settings.end(), [](const auto& a, const auto& b) { return a.second < b.second; });

  // Memory per (model, precision): the largest measured peak of its runs.
  std::vector<MemoryRow> memory;
  for (const auto& m : models)
    for (const auto& p : precisions) {
      MemoryRow row{m, p, std::nullopt, std::nullopt, std::nullopt, 0};
      for (const auto& r : results) {
        if (r.model_name != m || r.precision != p) continue;
        ++row.results;
        if (r.peak_rss_bytes) row.peak = std::max(row.peak.value_or(0), *r.peak_rss_bytes);
        if (r.weight_bytes) row.weights = std::max(row.weights.value_or(0), *r.weight_bytes);
        if (r.gpu_peak_bytes) row.gpu_peak = std::max(row.gpu_peak.value_or(0), *r.gpu_peak_bytes);
      }
      if (row.results) memory.push_back(row);
    }
  auto peak_of = [&](const RunResult& r) -> std::optional<double> {
    for (const auto& m : memory)
      if (m.model_name == r.model_name && m.precision == r.precision) return m.shown();
    return std::nullopt;
  };

  // ---- Tables (one field list each, every format).
  struct PivotRow {
    std::string model, precision, setting;
    std::map<std::string, const RunResult*> by_task;
  };
  std::vector<PivotRow> pivot;
  for (const auto& s : settings)
    for (const auto& m : models)
      for (const auto& p : precisions) {
        PivotRow row{m, p, s.second, {}};
        for (const auto& r : results)
          if (r.model_name == m && r.precision == p && setting_key(r) == s.first) row.by_task[r.task] = &r;
        if (!row.by_task.empty()) pivot.push_back(row);
      }
  std::vector<Field<PivotRow>> score_fields = {
      {"model", false, [](const PivotRow& r) { return r.model; }},
      {"precision", false, [](const PivotRow& r) { return precision_label(r.precision); }},
      {"setting", false, [](const PivotRow& r) { return r.setting; }}};
  for (const auto& t : tasks)
    score_fields.push_back({t, true, [t](const PivotRow& r) {
                              auto it = r.by_task.find(t);
                              return it == r.by_task.end() ? std::string() : fixed(it->second->score);
                            }});
  score_fields.push_back({"mean", true, [](const PivotRow& r) {
                            double sum = 0;
                            for (const auto& [t, x] : r.by_task) sum += x->score;
                            return fixed(sum / static_cast<double>(r.by_task.size()));
                          }});
  const Table scores_table = make_table("Scores (model × precision × setting by task)", score_fields, pivot);

  const std::vector<Field<Comparison>> delta_fields = {
      {"model", false, [](const Comparison& c) { return c.run->model_name; }},
      {"setting", false, [](const Comparison& c) { return setting_label(*c.run); }},
      {"task", false, [](const Comparison& c) { return c.run->task; }},
      {"precision", false, [](const Comparison& c) { return c.run->precision; }},
      {"baseline", false, [](const Comparison& c) { return precision_label(c.base->precision); }},
      {"score", true, [](const Comparison& c) { return fixed(c.run->score); }},
      {"baseline score", true, [](const Comparison& c) { return fixed(c.base->score); }},
      {"change", true, [](const Comparison& c) { return signed_fixed(c.delta); }},
      {"change 95% CI", true,
       [](const Comparison& c) { return c.ci_low ? "[" + fixed(*c.ci_low) + ", " + fixed(*c.ci_high) + "]" : std::string(); }},
      {"p", true, [](const Comparison& c) { return c.p_value ? fixed(*c.p_value, 3) : std::string(); }},
      {"significant", false, [](const Comparison& c) { return std::string(c.significant ? "yes" : "no"); }},
      {"test", false, [](const Comparison& c) { return c.test; }},
      {"n", true, [](const Comparison& c) { return std::to_string(c.shared_examples); }}};
  const Table deltas_table = make_table("Change versus 16-bit", delta_fields, comparisons);

  const std::vector<MeanComparison> means = mean_changes_vs_16bit(comparisons, o.bootstrap, o.seed);
  const std::vector<Field<MeanComparison>> mean_fields = {
      {"model", false, [](const MeanComparison& m) { return m.run->model_name; }},
      {"setting", false, [](const MeanComparison& m) { return setting_label(*m.run); }},
      {"precision", false, [](const MeanComparison& m) { return precision_label(m.run->precision); }},
      {"baseline", false, [](const MeanComparison& m) { return precision_label(m.base->precision); }},
      {"tasks", true, [](const MeanComparison& m) { return std::to_string(m.tasks.size()); }},
      {"mean", true, [](const MeanComparison& m) { return fixed(m.mean); }},
      {"baseline mean", true, [](const MeanComparison& m) { return fixed(m.base_mean); }},
      {"change", true, [](const MeanComparison& m) { return signed_fixed(m.delta); }},
      {"change 95% CI", true,
       [](const MeanComparison& m) {
         return m.paired ? "[" + fixed(m.paired->ci.low) + ", " + fixed(m.paired->ci.high) + "]" : std::string();
       }},
      {"p", true, [](const MeanComparison& m) { return m.paired ? fixed(m.paired->p_value, 3) : std::string(); }},
      {"significant", false, [](const MeanComparison& m) { return std::string(m.significant ? "yes" : "no"); }},
      {"test", false, [](const MeanComparison& m) { return m.test; }},
      {"n", true, [](const MeanComparison& m) { return m.paired ? std::to_string(m.paired->n) : std::string(); }}};
  const Table mean_table = make_table("Change of the mean over tasks versus 16-bit", mean_fields, means);

  const std::vector<Field<MemoryRow>> memory_fields = {
      {"model", false, [](const MemoryRow& r) { return r.model_name; }},
      {"precision", false, [](const MemoryRow& r) { return precision_label(r.precision); }},
      {"peak RSS (MiB)", true, [](const MemoryRow& r) { return r.peak ? fixed(mib(*r.peak), 1) : std::string(); }},
      {"weights (MiB)", true, [](const MemoryRow& r) { return r.weights ? fixed(mib(*r.weights), 1) : std::string(); }},
      {"GPU peak (MiB)", true, [](const MemoryRow& r) { return r.gpu_peak ? fixed(mib(*r.gpu_peak), 1) : std::string(); }},
      {"results", true, [](const MemoryRow& r) { return std::to_string(r.results); }}};
  const Table memory_table = make_table("Memory by precision", memory_fields, memory);

  const std::vector<Field<RunResult>> result_fields = {
      {"model", false, [](const RunResult& r) { return r.model_name; }},
      {"model_path", false, [](const RunResult& r) { return r.model; }},
      {"model_hash", false, [](const RunResult& r) { return r.model_hash; }},
      {"precision", false, [](const RunResult& r) { return r.precision; }},
      {"method", false, [](const RunResult& r) { return r.method; }},
      {"shots", true, [](const RunResult& r) { return std::to_string(r.shots); }},
      {"scoring", false, [](const RunResult& r) { return r.scoring; }},
      {"task", false, [](const RunResult& r) { return r.task; }},
      {"split", false, [](const RunResult& r) { return r.split; }},
      {"metric", false, [](const RunResult& r) { return r.metric; }},
      {"score", true, [](const RunResult& r) { return fixed(r.score); }},
      {"ci_low", true, [](const RunResult& r) { return fixed(r.ci_low); }},
      {"ci_high", true, [](const RunResult& r) { return fixed(r.ci_high); }},
      {"n", true, [](const RunResult& r) { return std::to_string(r.n); }},
      {"unparsed", true, [](const RunResult& r) { return std::to_string(r.unparsed); }},
      {"seconds", true, [](const RunResult& r) { return fixed(r.seconds, 2); }},
      {"peak_rss_mib", true, [](const RunResult& r) { return r.peak_rss_bytes ? fixed(mib(*r.peak_rss_bytes), 1) : ""; }},
      {"weights_mib", true, [](const RunResult& r) { return r.weight_bytes ? fixed(mib(*r.weight_bytes), 1) : ""; }},
      {"gpu_peak_mib", true, [](const RunResult& r) { return r.gpu_peak_bytes ? fixed(mib(*r.gpu_peak_bytes), 1) : ""; }},
      {"device", false, [](const RunResult& r) { return r.device; }},
      {"created_at", false, [](const RunResult& r) { return r.created_at; }}};
  const Table results_table = make_table("All results", result_fields, results);

  // ---- Stamp.
  std::set<std::string> versions, devices;
  for (const auto& r : results) {
    versions.insert(r.version);
    devices.insert(r.device);
  }
  auto joined = [](const std::set<std::string>& s) {
    std::string out;
    for (const auto& x : s) out += (out.empty() ? "" : ", ") + (x.empty() ? std::string("?") : x);
    return out;
  };
  const std::string stamp = "generated " + utc_now() + " from " + (o.db_path.empty() ? "the results database" : o.db_path) +
                            " · " + std::to_string(results.size()) + " results · BioQuant " + joined(versions) +
                            " · device " + joined(devices) + " · CPU " + cpu_name() + " (" +
                            std::to_string(std::thread::hardware_concurrency()) + " threads) · GPU none";
  const std::string significance_note =
      "Significance: " + std::to_string(summary.paired) + " change(s) tested by paired bootstrap on the sample files (" +
      std::to_string(o.bootstrap) + " replicates, seed " + std::to_string(o.seed) +
      "; * = its 95% CI of the change excludes 0), " + std::to_string(summary.ci_based) +
      " by comparing the two runs' own 95% CIs because a samples file was missing († = the CIs do not overlap). "
      "Significant cells have a black border. With fewer than " + std::to_string(kMinPairedExamples) +
      " shared examples a change is shown but not tested.";

  // ---- HTML.
  std::string html;
  html += "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>" + html_escape(o.title) +
          "</title><link rel=\"icon\" href=\"data:,\"><meta name=\"viewport\" content=\"width=device-width\"><style>" +
          kCss + "</style></head><body>\n";
  html += "<h1>" + html_escape(o.title) + "</h1><div class=\"stamp\">" + html_escape(stamp) + "</div>\n";
  html += "<div class=\"chart\">" + legend(precisions) + "</div>\n";
  const bool gib = [&] {
    double maxv = 0;
    for (const auto& m : memory) maxv = std::max(maxv, m.shown().value_or(0));
    return maxv >= 2.0 * 1024 * 1024 * 1024;
  }();
  for (const auto& [skey, slabel] : settings) {
    html += "<h2>" + html_escape(slabel) + "</h2>\n";
    html += "<h3>Score vs. peak memory per task (a GPU's for pairs run on one, else RSS; dashed: Pareto front; outlined "
            "points are on it)</h3><div class=\"grid\">";
    for (const auto& t : tasks) {
      std::vector<Point> points;
      for (const auto& r : results) {
        if (r.task != t || setting_key(r) != skey) continue;
        const auto peak = peak_of(r);
        if (!peak) continue;
        points.push_back({*peak, r.score, r.model_name + " " + precision_label(r.precision), r.precision});
      }
      if (!points.empty()) html += scatter_pareto(t, points, gib);
    }
    html += "</div>\n";
    for (const auto& m : models) {
      std::map<std::pair<std::string, std::string>, const RunResult*> cell;
      std::vector<std::string> mp, mt;
      for (const auto& r : results) {
        if (r.model_name != m || setting_key(r) != skey) continue;
        cell[{r.task, r.precision}] = &r;
      }
      if (cell.empty()) continue;
      for (const auto& p : precisions)
        for (const auto& [k, r] : cell)
          if (k.second == p && std::find(mp.begin(), mp.end(), p) == mp.end()) mp.push_back(p);
      for (const auto& t : tasks)
        for (const auto& [k, r] : cell)
          if (k.first == t && std::find(mt.begin(), mt.end(), t) == mt.end()) mt.push_back(t);
      html += "<h3>" + html_escape(m) + ": scores by precision with 95% CI</h3><div class=\"chart\">" +
              bars_with_ci(m + " · " + slabel, mt, mp, cell) + "</div>\n";
      std::map<std::pair<std::string, std::string>, const Comparison*> hcell;
      std::vector<std::string> hp;
      std::string base_precision;
      for (const auto& c : comparisons) {
        if (c.run->model_name != m || setting_key(*c.run) != skey) continue;
        hcell[{c.run->task, c.run->precision}] = &c;
        base_precision = c.base->precision;
      }
      for (const auto& p : mp)
        for (const auto& [k, c] : hcell)
          if (k.second == p && std::find(hp.begin(), hp.end(), p) == hp.end()) hp.push_back(p);
      if (!hcell.empty())
        html += "<h3>" + html_escape(m) + ": score change versus " +
                html_escape(base_precision == "none" ? "the stored model" : base_precision) +
                "</h3><div class=\"chart\">" +
                heatmap(m + " · " + slabel + " · change vs 16-bit", base_precision, mt, hp, hcell) + "</div>\n";
    }
  }
  html += "<h2>Memory</h2><div class=\"chart\">" + memory_bars(memory) + "</div>\n";
  html += "<p class=\"note\">Peak memory is the measured resident-set high-water mark of the run (for a sweep, of "
          "each model and precision from its load on), the largest over its tasks.</p>\n";
  html += "<h2>Tables</h2><p class=\"note\">" + html_escape(significance_note) + "</p>\n";
  html += to_html(scores_table) + to_html(mean_table) + to_html(deltas_table) + to_html(memory_table);
  html += "<details><summary>All results (" + std::to_string(results.size()) + ")</summary>" + to_html(results_table) +
          "</details>\n";
  html += "</body></html>\n";

  // ---- Markdown.
  std::string md = "# " + o.title + "\n\n" + stamp + "\n\n" + to_markdown(scores_table) + "\n" + to_markdown(mean_table) +
                   "\n" + to_markdown(deltas_table) +
                   "\n" + significance_note + "\n\n" + to_markdown(memory_table) + "\n";

  fs::create_directories(o.out_dir);
  auto write = [&](const std::string& name, const std::string& content) {
    const std::string path = (fs::path(o.out_dir) / name).string();
    write_file_atomically(path, [&](std::ostream& out) { out << content; });
    summary.files.push_back(path);
  };
  write("index.html", html);
  write("results.md", md);
  write("scores.csv", to_csv(scores_table));
  write("deltas.csv", to_csv(deltas_table));
  write("mean_deltas.csv", to_csv(mean_table));
  write("memory.csv", to_csv(memory_table));
  write("results.csv", to_csv(results_table));
  return summary;
}

}  // namespace bioquant::report
