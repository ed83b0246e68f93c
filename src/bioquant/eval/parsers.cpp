// Output parsers: messy LLM text -> Prediction. See parsers.h for the contract of each family.
//
// Building blocks, shared by the families:
//   normalize()        a few Unicode look-alikes (dashes, curly quotes, odd spaces, fullwidth ':')
//                      folded to ASCII, so "5–FU" and "CPR：4" compare like "5-FU" and "CPR:4";
//   words_of()         lowercase ASCII alphanumeric runs with their byte offsets ('&' is "and"):
//                      labels and outputs are compared as word sequences, which gives whole-word
//                      matching and indifference to spacing/punctuation in one rule;
//   find_mentions()    leftmost-longest, non-overlapping occurrences of label phrases;
//   negated_at()       a negation word in the same clause just before a mention;
//   find_markers()     "answer:" / "answer is" / "relation is" ... (keyword + separator);
//   LenientJson        a JSON reader that accepts what models write (single quotes, unquoted
//                      keys/values, trailing commas, missing closing brackets);
//   align_fitting()    a character alignment of the gold tokens against the output (NER).
// Nothing here throws on bad input; the public functions also catch everything (bad_alloc).
#include "bioquant/eval/parsers.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <charconv>
#include <cstdint>
#include <map>
#include <set>

#include "bioquant/tokenizer/unicode.h"

namespace bioquant::eval {
namespace {

// ---------------------------------------------------------------------------------------------
// Characters and words

bool is_alnum(char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}
bool is_alpha(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
bool is_upper(char c) { return c >= 'A' && c <= 'Z'; }
bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }
char to_lower(char c) { return is_upper(c) ? static_cast<char>(c - 'A' + 'a') : c; }
char to_upper(char c) { return (c >= 'a' && c <= 'z') ? static_cast<char>(c - 'a' + 'A') : c; }

std::string lower(std::string_view s) {
  std::string out(s);
  for (char& c : out) c = to_lower(c);
  return out;
}

std::string_view trim(std::string_view s) {
  size_t b = 0, e = s.size();
  while (b < e && is_space(s[b])) ++b;
  while (e > b && is_space(s[e - 1])) --e;
  return s.substr(b, e - b);
}

// Unicode look-alikes folded to ASCII: dashes and minus -> '-', curly quotes -> ' and ", no-break
// and other typographic spaces -> ' ', fullwidth ':' and ',' -> ':' and ','.
std::string normalize(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    const auto b0 = static_cast<unsigned char>(s[i]);
    const auto b1 = i + 1 < s.size() ? static_cast<unsigned char>(s[i + 1]) : 0;
    const auto b2 = i + 2 < s.size() ? static_cast<unsigned char>(s[i + 2]) : 0;
    char repl = 0;
    size_t len = 1;
    if (b0 == 0xC2 && b1 == 0xA0) {
      repl = ' ', len = 2;
    } else if (b0 == 0xE2 && b1 == 0x80 && b2 >= 0x90 && b2 <= 0x95) {
      repl = '-', len = 3;
    } else if (b0 == 0xE2 && b1 == 0x88 && b2 == 0x92) {
      repl = '-', len = 3;
    } else if (b0 == 0xE2 && b1 == 0x80 && (b2 == 0x98 || b2 == 0x99 || b2 == 0x9B)) {
      repl = '\'', len = 3;
    } else if (b0 == 0xE2 && b1 == 0x80 && (b2 == 0x9C || b2 == 0x9D || b2 == 0x9F)) {
      repl = '"', len = 3;
    } else if (b0 == 0xE2 && b1 == 0x80 && ((b2 >= 0x80 && b2 <= 0x8B) || b2 == 0xAF)) {
      repl = ' ', len = 3;
    } else if (b0 == 0xE3 && b1 == 0x80 && b2 == 0x80) {
      repl = ' ', len = 3;
    } else if (b0 == 0xEF && b1 == 0xBC && b2 == 0x9A) {
      repl = ':', len = 3;
    } else if (b0 == 0xEF && b1 == 0xBC && b2 == 0x8C) {
      repl = ',', len = 3;
    }
    if (repl != 0) {
      out += repl;
    } else {
      out += s[i];
    }
    i += len;
  }
  return out;
}

struct Word {
  std::string text;  // lowercase
  size_t begin = 0;  // byte offsets in the source text
  size_t end = 0;
};

// Lowercase ASCII alphanumeric runs. Everything else (punctuation, spaces, non-ASCII bytes)
// separates words; '&' is itself the word "and" ("invasion & metastasis").
std::vector<Word> words_of(std::string_view s) {
  std::vector<Word> out;
  for (size_t i = 0; i < s.size();) {
    if (s[i] == '&') {
      out.push_back({"and", i, i + 1});
      ++i;
    } else if (is_alnum(s[i])) {
      size_t j = i;
      std::string w;
      while (j < s.size() && is_alnum(s[j])) w += to_lower(s[j++]);
      out.push_back({std::move(w), i, j});
      i = j;
    } else {
      ++i;
    }
  }
  return out;
}

// A phrase's comparison key: its words concatenated ("CPR:3" -> "cpr3", "Case Report" -> "casereport").
std::string phrase_key(std::string_view s) {
  std::string key;
  for (const Word& w : words_of(normalize(s))) key += w.text;
  return key;
}

// ---------------------------------------------------------------------------------------------
// Label phrases in text

struct Pattern {
  std::string key;  // phrase_key of the phrase
  int label = -1;   // index into the label set
};

struct Mention {
  int label = -1;
  size_t begin = 0, end = 0;  // bytes
  bool negated = false;
  bool alternative = false;  // inside "X or Y" / "X/Y" alternatives
};

// Words w[k..] concatenate to `key`, with short same-line separators between them (at most 4
// bytes: "CPR : 4", "DDI - effect", a fullwidth colon). Returns the number of words, 0 if no match.
size_t match_at(const std::vector<Word>& w, std::string_view text, size_t k, const std::string& key) {
  size_t got = 0;
  for (size_t j = k; j < w.size(); ++j) {
    if (j > k) {
      const std::string_view gap = text.substr(w[j - 1].end, w[j].begin - w[j - 1].end);
      if (gap.size() > 4 || gap.find('\n') != std::string_view::npos) return 0;
    }
    const std::string& t = w[j].text;
    if (got + t.size() > key.size() || key.compare(got, t.size(), t) != 0) return 0;
    got += t.size();
    if (got == key.size()) return j - k + 1;
  }
  return 0;
}

// Words that negate what follows in the same clause.
bool is_negator(const std::string& w) {
  static const std::set<std::string> kNeg = {"not", "no", "never", "t", "neither", "nor", "without",
                                              "except", "excluding", "non", "nothing"};
  return kNeg.count(w) > 0;
}

// A negation within the three words before byte `pos`, not crossing a clause boundary (. ; ! ? , :
// or a line break) nor `stop` (the end of the previous mention). "rather than", "instead of",
// "other than" count too. "not CPR:3, it is CPR:4": CPR:3 is negated, CPR:4 is not.
bool negated_at(std::string_view text, size_t pos, size_t stop) {
  size_t p = pos;
  std::vector<std::string> prev;  // nearest first
  while (prev.size() < 3 && p > stop) {
    // gap before the word
    size_t q = p;
    while (q > stop && !is_alnum(text[q - 1])) {
      const char c = text[q - 1];
      if (c == '.' || c == ';' || c == '!' || c == '?' || c == ',' || c == ':' || c == '\n') {
        q = stop;  // clause boundary
        break;
      }
      --q;
    }
    if (q <= stop) break;
    size_t b = q;
    while (b > stop && is_alnum(text[b - 1])) --b;
    prev.push_back(lower(text.substr(b, q - b)));
    p = b;
  }
  for (size_t i = 0; i < prev.size(); ++i) {
    if (is_negator(prev[i])) return true;
    if (i + 1 < prev.size()) {
      const std::string& a = prev[i + 1];
      const std::string& b = prev[i];
      if ((a == "rather" && b == "than") || (a == "instead" && b == "of") || (a == "other" && b == "than"))
        return true;
    }
  }
  return false;
}

// Leftmost-longest non-overlapping mentions of the patterns.
std::vector<Mention> find_mentions(std::string_view text, const std::vector<Word>& w,
                                   const std::vector<Pattern>& patterns) {
  std::vector<Mention> out;
  size_t prev_end = 0;
  for (size_t k = 0; k < w.size();) {
    size_t best_len = 0, best_chars = 0;
    int best_label = -1;
    for (const Pattern& p : patterns) {
      if (p.key.empty()) continue;
      const size_t len = match_at(w, text, k, p.key);
      if (len > 0 && p.key.size() > best_chars) {
        best_len = len, best_chars = p.key.size(), best_label = p.label;
      }
    }
    if (best_len == 0) {
      ++k;
      continue;
    }
    Mention m;
    m.label = best_label;
    m.begin = w[k].begin;
    m.end = w[k + best_len - 1].end;
    m.negated = negated_at(text, m.begin, prev_end);
    out.push_back(m);
    prev_end = m.end;
    k += best_len;
  }
  return out;
}

// Marks mentions that are offered as alternatives: a chain of mentions joined only by "or", '/',
// '|' (and commas, when the chain has one of those): "yes or no", "yes/no/maybe", "yes, no, or maybe".
void mark_alternatives(std::string_view text, std::vector<Mention>& ms) {
  if (ms.size() < 2) return;
  // link[i]: 0 none, 1 weak (commas only), 2 strong (or / | )
  std::vector<int> link(ms.size() - 1, 0);
  for (size_t i = 0; i + 1 < ms.size(); ++i) {
    const std::string_view between = text.substr(ms[i].end, ms[i + 1].begin - ms[i].end);
    bool ok = true, strong = false, comma = false;
    for (const Word& w : words_of(between)) {
      if (w.text == "or") {
        strong = true;
      } else {
        ok = false;
      }
    }
    for (char c : between) {
      if (is_alnum(c) || is_space(c)) continue;
      if (c == '/' || c == '|') {
        strong = true;
      } else if (c == ',') {
        comma = true;
      } else if (c != '"' && c != '\'' && c != '`' && c != '*' && c != '(' && c != ')') {
        ok = false;
      }
    }
    if (ok) link[i] = strong ? 2 : (comma ? 1 : 0);
  }
  for (size_t i = 0; i < link.size();) {
    if (link[i] == 0) {
      ++i;
      continue;
    }
    size_t j = i;
    bool has_strong = false;
    while (j < link.size() && link[j] != 0) has_strong |= link[j++] == 2;
    if (has_strong) {
      std::set<int> labels;
      for (size_t k = i; k <= j; ++k) labels.insert(ms[k].label);
      if (labels.size() >= 2)
        for (size_t k = i; k <= j; ++k) ms[k].alternative = true;
    }
    i = j;
  }
}

// Answer markers: a keyword (whole word, case-insensitive) followed by a separator: ':', '=', "->",
// " - ", "is", "was", "would be", "should be", "will be" (markdown '*'/'_' around them allowed).
// Returns the byte offset just after each marker (after the separator and any spaces/'*'), in order.
std::vector<size_t> find_markers(std::string_view text, const std::vector<std::string>& keywords) {
  const std::string low = lower(text);
  std::vector<size_t> out;
  auto skip = [&](size_t p, std::string_view chars) {
    while (p < low.size() && chars.find(low[p]) != std::string_view::npos) ++p;
    return p;
  };
  auto word_at = [&](size_t p, std::string_view w) {
    return low.compare(p, w.size(), w) == 0 && (p + w.size() >= low.size() || !is_alnum(low[p + w.size()]));
  };
  for (const std::string& kw : keywords) {
    for (size_t at = low.find(kw); at != std::string::npos; at = low.find(kw, at + 1)) {
      if (at > 0 && is_alnum(low[at - 1])) continue;
      const size_t after = at + kw.size();
      if (after < low.size() && is_alnum(low[after])) continue;
      size_t p = skip(after, " \t*_");
      size_t sep_end = std::string::npos;
      if (p < low.size() && (low[p] == ':' || low[p] == '=')) {
        sep_end = p + 1;
      } else if (low.compare(p, 2, "->") == 0) {
        sep_end = p + 2;
      } else if (p < low.size() && low[p] == '-' && p + 1 < low.size() && low[p + 1] == ' ') {
        sep_end = p + 1;
      } else if (word_at(p, "is") || word_at(p, "was") || word_at(p, "are")) {
        sep_end = p + (low[p] == 'i' ? 2 : 3);
      } else {
        for (std::string_view modal : {"would", "should", "will", "must", "might", "could"}) {
          if (word_at(p, modal)) {
            const size_t q = skip(p + modal.size(), " \t");
            if (word_at(q, "be")) sep_end = q + 2;
            break;
          }
        }
      }
      if (sep_end == std::string::npos) continue;
      p = skip(sep_end, " \t*_");
      if (p < low.size() && low[p] == ':') p = skip(p + 1, " \t*_");
      out.push_back(p);
    }
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

// From `pos`, the end of the first non-empty line (the segment an answer marker governs).
size_t marker_segment_end(std::string_view text, size_t pos) {
  size_t p = pos;
  while (p < text.size() && is_space(text[p])) ++p;
  const size_t nl = text.find('\n', p);
  return nl == std::string_view::npos ? text.size() : nl;
}

struct ChooseOptions {
  std::vector<std::string> marker_keywords;
  bool alternatives = false;  // skip mentions inside "X or Y" alternatives
  size_t echo_threshold = 3;  // this many distinct decisive labels (no marker) = an echoed list
};

// One label from free text: answer markers win (the last marker whose line holds a decisive
// mention), then the first decisive mention unless echo_threshold distinct labels are mentioned.
// Decisive = not negated (and not an alternative, when asked). -1 when nothing decides.
int choose_label(std::string_view text, const std::vector<Pattern>& patterns, const ChooseOptions& opt) {
  const std::vector<Word> w = words_of(text);
  std::vector<Mention> ms = find_mentions(text, w, patterns);
  if (opt.alternatives) mark_alternatives(text, ms);
  auto decisive = [&](const Mention& m) { return !m.negated && !(opt.alternatives && m.alternative); };
  const std::vector<size_t> markers = find_markers(text, opt.marker_keywords);
  for (auto it = markers.rbegin(); it != markers.rend(); ++it) {
    const size_t seg_end = marker_segment_end(text, *it);
    for (const Mention& m : ms) {
      if (m.begin >= *it && m.begin < seg_end && decisive(m)) return m.label;
    }
  }
  std::set<int> distinct;
  int first = -1;
  for (const Mention& m : ms) {
    if (!decisive(m)) continue;
    if (first < 0) first = m.label;
    distinct.insert(m.label);
  }
  if (distinct.size() >= opt.echo_threshold) return -1;
  return first;
}

// Patterns for a label set plus the aliases whose target is one of its labels.
std::vector<Pattern> label_patterns(const std::vector<std::string>& labels,
                                    const std::vector<std::pair<std::string, std::string>>& aliases) {
  std::vector<Pattern> out;
  for (size_t i = 0; i < labels.size(); ++i) out.push_back({phrase_key(labels[i]), static_cast<int>(i)});
  for (const auto& [phrase, target] : aliases) {
    int idx = -1;
    for (size_t i = 0; i < labels.size() && idx < 0; ++i)
      if (labels[i] == target) idx = static_cast<int>(i);
    const std::string tkey = phrase_key(target);
    for (size_t i = 0; i < labels.size() && idx < 0; ++i)
      if (!tkey.empty() && phrase_key(labels[i]) == tkey) idx = static_cast<int>(i);
    if (idx >= 0) out.push_back({phrase_key(phrase), idx});
  }
  return out;
}

// "None", "No entities found", "N/A", "[]", "There are no chemical entities", "Entities: none".
bool explicit_none(std::string_view text) {
  const std::string_view t = trim(text);
  if (t.empty()) return false;
  const std::vector<Word> w = words_of(t);
  if (w.empty()) {
    return t.find("[]") != std::string_view::npos || t.find("{}") != std::string_view::npos;
  }
  static const std::set<std::string> kNone = {"none", "nothing", "null", "nil"};
  if (kNone.count(w[0].text) || (w[0].text == "n" && w.size() >= 2 && w[1].text == "a")) return true;
  if (w[0].text == "no" && w.size() <= 15) return true;
  for (size_t i = 0; i < w.size() && i < 4; ++i)
    if (w[i].text == "none") return true;
  static const std::vector<std::vector<std::string>> kPhrases = {
      {"there", "are", "no"}, {"there", "is", "no"},     {"contains", "no"},      {"found", "no"},
      {"no", "entities"},     {"no", "entity"},          {"not", "contain", "any"}, {"none", "found"},
      {"no", "labels"},       {"no", "label"},           {"none", "of"},          {"not", "related", "to", "any"},
      {"no", "relevant"},     {"does", "not", "mention", "any"}};
  for (size_t i = 0; i < w.size() && i < 25; ++i) {
    for (const auto& ph : kPhrases) {
      if (i + ph.size() > w.size()) continue;
      bool ok = true;
      for (size_t k = 0; k < ph.size() && ok; ++k) ok = w[i + k].text == ph[k];
      if (ok) return true;
    }
  }
  return false;
}

// Lines that open or close a markdown code fence (```json, ```html, ```) are dropped.
std::string strip_fences(std::string_view s) {
  std::string out;
  size_t i = 0;
  while (i <= s.size()) {
    size_t nl = s.find('\n', i);
    if (nl == std::string_view::npos) nl = s.size();
    const std::string_view line = s.substr(i, nl - i);
    if (trim(line).substr(0, 3) != "```") {
      out.append(line);
      if (nl < s.size()) out += '\n';
    }
    i = nl + 1;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Lenient JSON

struct JNode {
  enum Kind { scalar, object, array } kind = scalar;
  std::string text;  // scalar
  bool quoted = false;
  std::vector<std::pair<std::string, JNode>> members;
  std::vector<JNode> items;
};

// Accepts single or double quotes, unquoted keys and values, '=' for ':', trailing or missing
// commas, and a missing closing bracket (the value ends at the end of the text). Depth-limited.
class LenientJson {
 public:
  LenientJson(std::string_view s, size_t pos) : s_(s), p_(pos) {}
  JNode value(int depth) {
    skip_ws();
    JNode node;
    if (p_ >= s_.size()) return node;
    const char c = s_[p_];
    if (depth > 32) {
      node.text = bare(",}]");
      return node;
    }
    if (c == '{') {
      ++p_;
      node.kind = JNode::object;
      while (true) {
        const size_t start = p_;
        skip_ws_commas();
        if (p_ >= s_.size()) break;
        if (s_[p_] == '}' || s_[p_] == ']') {
          ++p_;
          break;
        }
        std::string key = (s_[p_] == '"' || s_[p_] == '\'') ? quoted() : bare(":=,}]");
        skip_ws();
        JNode val;
        if (p_ < s_.size() && (s_[p_] == ':' || s_[p_] == '=')) {
          ++p_;
          skip_spaces();
          if (p_ < s_.size() && s_[p_] != ',' && s_[p_] != '}' && s_[p_] != ']' && s_[p_] != '\n')
            val = value(depth + 1);
        }
        node.members.emplace_back(std::move(key), std::move(val));
        if (p_ == start) ++p_;  // no progress: skip a byte
      }
    } else if (c == '[') {
      ++p_;
      node.kind = JNode::array;
      while (true) {
        const size_t start = p_;
        skip_ws_commas();
        if (p_ >= s_.size()) break;
        if (s_[p_] == ']' || s_[p_] == '}') {
          ++p_;
          break;
        }
        node.items.push_back(value(depth + 1));
        if (p_ == start) ++p_;
      }
    } else if (c == '"' || c == '\'') {
      node.text = quoted();
      node.quoted = true;
    } else {
      node.text = bare(",}]");
    }
    return node;
  }

 private:
  void skip_ws() {
    while (p_ < s_.size() && is_space(s_[p_])) ++p_;
  }
  void skip_spaces() {
    while (p_ < s_.size() && (s_[p_] == ' ' || s_[p_] == '\t')) ++p_;
  }
  void skip_ws_commas() {
    while (p_ < s_.size() && (is_space(s_[p_]) || s_[p_] == ',')) ++p_;
  }
  std::string quoted() {
    const char q = s_[p_++];
    std::string out;
    while (p_ < s_.size()) {
      const char c = s_[p_];
      if (c == '\\' && p_ + 1 < s_.size()) {
        const char e = s_[p_ + 1];
        out += e == 'n' ? '\n' : e == 't' ? '\t' : e;
        p_ += 2;
        continue;
      }
      ++p_;
      if (c == q) break;
      if (c == '\n' && q == '\'') break;  // an apostrophe, not a quote: stop at the line end
      out += c;
    }
    return out;
  }
  std::string bare(std::string_view stops) {
    const size_t b = p_;
    while (p_ < s_.size() && s_[p_] != '\n' && stops.find(s_[p_]) == std::string_view::npos) ++p_;
    return std::string(trim(s_.substr(b, p_ - b)));
  }

  std::string_view s_;
  size_t p_;
};

// 1 / 0 for a truth-like value ("1", 1.0, true, "yes", "Related", "✓"), -1 for anything else
// (an empty value, a sentence). Numbers: >= 0.5 is true (probabilities).
int truth_value(std::string_view raw) {
  std::string_view t = trim(raw);
  while (!t.empty() && (t.front() == '*' || t.front() == '`' || t.front() == '"' || t.front() == '\''))
    t.remove_prefix(1);
  t = trim(t);
  if (t.empty()) return -1;
  if (t.substr(0, 3) == "\xE2\x9C\x93" || t.substr(0, 3) == "\xE2\x9C\x94" || t.substr(0, 3) == "\xE2\x9C\x85")
    return 1;
  if (t.substr(0, 3) == "\xE2\x9C\x97" || t.substr(0, 3) == "\xE2\x9C\x98" || t.substr(0, 3) == "\xE2\x9D\x8C")
    return 0;
  if ((t[0] >= '0' && t[0] <= '9') || t[0] == '.' || t[0] == '-') {
    double v = 0;
    const auto r = std::from_chars(t.data(), t.data() + t.size(), v);
    if (r.ec == std::errc() && (r.ptr == t.data() + t.size() || !is_alnum(*r.ptr))) return v >= 0.5 ? 1 : 0;
  }
  const std::vector<Word> w = words_of(t);
  if (w.empty()) return -1;
  static const std::set<std::string> kTrue = {"true", "yes", "y", "t", "related", "relevant", "positive",
                                               "present", "x"};
  static const std::set<std::string> kFalse = {"false", "no", "n", "f", "null", "none", "not", "irrelevant",
                                                "unrelated", "negative", "absent", "nan"};
  if (kTrue.count(w[0].text)) return 1;
  if (kFalse.count(w[0].text)) return 0;
  return -1;
}

// ---------------------------------------------------------------------------------------------
// NER

struct Tag {
  size_t len = 0;
  std::string name;  // lowercase; "!" for comments / doctype
  bool close = false;
};

// An HTML-ish tag at s[i] == '<': "<name attrs>", "</name>", "<name/>", "<!...>". A '<' followed
// by a space or digit ("P < 0.05", "<0.05") is text.
bool read_tag(std::string_view s, size_t i, Tag& tag) {
  size_t p = i + 1;
  if (p < s.size() && s[p] == '!') {
    const size_t q = s.find('>', p);
    if (q == std::string_view::npos || q - i > 1024) return false;
    tag = {q - i + 1, "!", false};
    return true;
  }
  bool close = false;
  if (p < s.size() && s[p] == '/') close = true, ++p;
  if (p >= s.size() || !is_alpha(s[p])) return false;
  std::string name;
  while (p < s.size() && (is_alnum(s[p]) || s[p] == '-' || s[p] == '_')) name += to_lower(s[p++]);
  size_t q = p;
  while (q < s.size() && s[q] != '>' && s[q] != '<' && q - i < 512) ++q;
  if (q >= s.size() || s[q] != '>') return false;
  const std::string_view attrs = s.substr(p, q - p);
  if (!attrs.empty() && !is_space(attrs[0]) && attrs[0] != '/') return false;
  if (close && !trim(attrs).empty()) return false;
  tag = {q - i + 1, std::move(name), close};
  return true;
}

// Tags that structure a document rather than mark an entity. Every other tag (span, mark, b,
// strong, em, u, font, or a made-up <chemical>) marks its content.
bool is_structural_tag(const std::string& name) {
  static const std::set<std::string> kStructural = {
      "!",    "html",   "head",   "body",    "p",      "div",    "br",      "hr",   "pre",   "code",
      "ul",   "ol",     "li",     "table",   "tbody",  "thead",  "tr",      "td",   "th",    "h1",
      "h2",   "h3",     "h4",     "h5",      "h6",     "i",      "sup",     "sub",  "title", "meta",
      "style", "script", "a",     "section", "article", "header", "footer", "main", "nav",   "sentence",
      "output", "input", "text",  "doctype", "blockquote", "small", "abbr", "cite", "q",     "s"};
  return kStructural.count(name) > 0;
}
bool is_block_tag(const std::string& name) {
  static const std::set<std::string> kBlock = {"p",  "div", "br", "hr", "li", "tr", "h1", "h2", "h3",
                                               "h4", "h5",  "h6", "ul", "ol", "table", "pre", "section",
                                               "blockquote"};
  return kBlock.count(name) > 0;
}

// "&amp;" at s[i]: appends the decoded text and returns the length consumed (0 if not an entity).
size_t decode_entity(std::string_view s, size_t i, std::string& out) {
  const size_t semi = s.find(';', i);
  if (semi == std::string_view::npos || semi - i > 10 || semi == i + 1) return 0;
  const std::string_view body = s.substr(i + 1, semi - i - 1);
  uint32_t cp = 0;
  if (body[0] == '#') {
    const bool hex = body.size() > 1 && (body[1] == 'x' || body[1] == 'X');
    const std::string_view digits = body.substr(hex ? 2 : 1);
    if (digits.empty()) return 0;
    const auto r = std::from_chars(digits.data(), digits.data() + digits.size(), cp, hex ? 16 : 10);
    if (r.ec != std::errc() || r.ptr != digits.data() + digits.size() || cp == 0 || cp > 0x10FFFF) return 0;
  } else {
    static const std::map<std::string, uint32_t, std::less<>> kNamed = {
        {"amp", '&'},     {"lt", '<'},      {"gt", '>'},      {"quot", '"'},    {"apos", '\''},
        {"nbsp", ' '},    {"ndash", '-'},   {"mdash", '-'},   {"minus", '-'},   {"plusmn", 0xB1},
        {"micro", 0xB5},  {"deg", 0xB0},    {"times", 0xD7},  {"alpha", 0x3B1}, {"beta", 0x3B2},
        {"gamma", 0x3B3}, {"mu", 0x3BC},    {"ge", 0x2265},   {"le", 0x2264},   {"rsquo", '\''},
        {"lsquo", '\''},  {"rdquo", '"'},   {"ldquo", '"'},   {"hellip", 0x2026}};
    const auto it = kNamed.find(body);
    if (it == kNamed.end()) return 0;
    cp = it->second;
  }
  std::string enc;
  unicode::append_utf8(enc, cp);
  out += normalize(enc);
  return semi - i + 1;
}

// The output as plain text (tags removed, entities decoded, normalized) and its marking elements
// as ranges of that text.
struct Markup {
  std::string plain;
  struct Element {
    size_t begin = 0, end = 0;
  };
  std::vector<Element> elements;  // outermost elements only, sorted, disjoint, non-empty
};

// Elements nest; an element that is never closed ends where the next marking tag is, at the end of
// its line, or before clause punctuation followed by a space (", " "; " ". "), whichever is first.
// A close tag closes the innermost open element of that name (and any opened inside it); a close
// tag with no open element of its name is ignored. "**bold**" pairs like a tag. Only the outermost
// element of a nest counts (inner ones are part of it).
Markup parse_markup(std::string_view raw) {
  const std::string src = normalize(strip_fences(raw));
  Markup mk;
  struct Open {
    std::string name;
    size_t begin;
    size_t event;  // index into events of its opening
  };
  std::vector<Open> stack;
  std::vector<size_t> events;  // plain offsets of marking tags, in order
  struct Raw {
    size_t begin, end;
  };
  std::vector<Raw> elems;
  constexpr size_t kMaxDepth = 32;
  auto close_from = [&](size_t idx) {  // closes stack[idx..]
    for (size_t k = idx; k < stack.size(); ++k) elems.push_back({stack[k].begin, mk.plain.size()});
    stack.resize(idx);
  };
  for (size_t i = 0; i < src.size();) {
    const char c = src[i];
    Tag tag;
    if (c == '<' && read_tag(src, i, tag)) {
      i += tag.len;
      if (is_structural_tag(tag.name)) {
        if (is_block_tag(tag.name)) mk.plain += '\n';
        continue;
      }
      const bool self_closing = !tag.close && src[i - 2] == '/';
      if (self_closing) continue;
      events.push_back(mk.plain.size());
      if (tag.close) {
        for (size_t k = stack.size(); k-- > 0;) {
          if (stack[k].name == tag.name) {
            close_from(k);
            break;
          }
        }
      } else if (stack.size() < kMaxDepth) {
        stack.push_back({tag.name, mk.plain.size(), events.size() - 1});
      }
      continue;
    }
    if (c == '*' && i + 1 < src.size() && src[i + 1] == '*') {
      i += 2;
      while (i < src.size() && src[i] == '*') ++i;  // "***" counts as one toggle
      events.push_back(mk.plain.size());
      size_t k = stack.size();
      while (k > 0 && stack[k - 1].name != "**") --k;
      if (k > 0) {
        close_from(k - 1);
      } else if (stack.size() < kMaxDepth) {
        stack.push_back({"**", mk.plain.size(), events.size() - 1});
      }
      continue;
    }
    if (c == '&') {
      const size_t n = decode_entity(src, i, mk.plain);
      if (n > 0) {
        i += n;
        continue;
      }
    }
    mk.plain += c;
    ++i;
  }
  for (const Open& o : stack) {
    size_t end = mk.plain.size();
    if (o.event + 1 < events.size()) end = std::min(end, events[o.event + 1]);
    const size_t nl = mk.plain.find('\n', o.begin);
    if (nl != std::string::npos) end = std::min(end, nl);
    // ... and before clause punctuation: "<span>5-fluorouracil, and <span>folinic acid</span>"
    for (size_t k = o.begin; k < end; ++k) {
      const char c = mk.plain[k];
      if ((c == ',' || c == ';' || c == '.' || c == ':' || c == '!' || c == '?') &&
          (k + 1 == end || is_space(mk.plain[k + 1]))) {
        end = k;
        break;
      }
    }
    elems.push_back({o.begin, end});
  }
  // Outermost first: by begin, longer first; an element inside an earlier one is absorbed.
  std::sort(elems.begin(), elems.end(), [](const Raw& a, const Raw& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end > b.end;
  });
  size_t covered_to = 0;
  for (const Raw& e : elems) {
    if (e.end <= e.begin || e.begin < covered_to) continue;
    const std::string_view content = std::string_view(mk.plain).substr(e.begin, e.end - e.begin);
    if (trim(content).empty()) continue;
    mk.elements.push_back({e.begin, e.end});
    covered_to = e.end;
  }
  return mk;
}

// Gold tokens as a character stream: lowercase non-whitespace characters and their token.
struct TokenChars {
  std::string chars;
  std::vector<int32_t> token;
  std::vector<std::string> keys;  // per token: its lowercase non-whitespace characters
};

TokenChars token_chars(const std::vector<std::string>& tokens) {
  TokenChars tc;
  tc.keys.resize(tokens.size());
  for (size_t t = 0; t < tokens.size(); ++t) {
    for (char c : normalize(tokens[t])) {
      if (is_space(c)) continue;
      tc.chars += to_lower(c);
      tc.token.push_back(static_cast<int32_t>(t));
      tc.keys[t] += to_lower(c);
    }
  }
  return tc;
}

struct Alignment {
  std::vector<int64_t> match;  // per token char: index into the output's non-ws chars, or -1
  double coverage = 0;         // share of token chars matched inside runs of >= 3 consecutive matches
  size_t unmarked_in_runs = 0;  // of those, matched to unmarked output characters
};

// Fitting alignment of all token characters T against a substring of the output characters O
// (free leading and trailing output: a preamble or an explanation costs nothing). Score: +4 per
// equal (case-insensitive) pair, +1 more when the output character is marked (so of two copies of
// the sentence the marked one wins), -3 per substitution, -2 per character skipped on either side.
Alignment align_fitting(const std::string& t, const std::string& o, const std::vector<uint8_t>& o_marked) {
  Alignment al;
  const size_t n = t.size();
  al.match.assign(n, -1);
  if (n == 0 || o.empty()) return al;
  constexpr size_t kMaxCells = size_t{8} << 20;
  if (n + 1 > kMaxCells / 2) return al;  // not a sentence
  const size_t m = std::min(o.size(), kMaxCells / (n + 1) - 1);
  constexpr int kMatch = 4, kMarkBonus = 1, kSub = -3, kGap = -2;
  enum : uint8_t { kDiag = 0, kUp = 1, kLeft = 2 };
  std::vector<uint8_t> dir((n + 1) * (m + 1), kLeft);
  std::vector<int32_t> prev(m + 1, 0), cur(m + 1, 0);
  for (size_t i = 1; i <= n; ++i) {
    cur[0] = kGap * static_cast<int32_t>(i);
    dir[i * (m + 1)] = kUp;
    for (size_t j = 1; j <= m; ++j) {
      const bool eq = t[i - 1] == o[j - 1];
      const int32_t d = prev[j - 1] + (eq ? kMatch + (o_marked[j - 1] ? kMarkBonus : 0) : kSub);
      const int32_t u = prev[j] + kGap;
      const int32_t l = cur[j - 1] + kGap;
      // Ties go to skipping the token character: traced back from the end, the output's characters
      // then pair with the earliest tokens that fit (a copy cut short ends at the cut, not later).
      int32_t best = u;
      uint8_t bd = kUp;
      if (d > best) best = d, bd = kDiag;
      if (l > best) best = l, bd = kLeft;
      cur[j] = best;
      dir[i * (m + 1) + j] = bd;
    }
    std::swap(prev, cur);
  }
  size_t j = 0;
  for (size_t k = 1; k <= m; ++k)
    if (prev[k] > prev[j]) j = k;
  size_t i = n;
  while (i > 0) {
    const uint8_t d = dir[i * (m + 1) + j];
    if (j > 0 && d == kDiag) {
      if (t[i - 1] == o[j - 1]) al.match[i - 1] = static_cast<int64_t>(j - 1);
      --i, --j;
    } else if (d == kLeft && j > 0) {
      --j;
    } else {
      --i;
    }
  }
  // Coverage counts matches in runs of >= 3 consecutive pairs: scattered single-letter matches
  // against unrelated prose do not make a copy of the sentence.
  const size_t min_run = std::min<size_t>(3, n);
  size_t counted = 0;
  for (size_t a = 0; a < n;) {
    if (al.match[a] < 0) {
      ++a;
      continue;
    }
    size_t b = a + 1;
    while (b < n && al.match[b] == al.match[b - 1] + 1) ++b;
    if (b - a >= min_run) {
      counted += b - a;
      for (size_t k = a; k < b; ++k) al.unmarked_in_runs += o_marked[static_cast<size_t>(al.match[k])] ? 0 : 1;
    }
    a = b;
  }
  al.coverage = static_cast<double>(counted) / static_cast<double>(n);
  return al;
}

// Sorted, unique, non-overlapping: of overlapping spans the longer (then the earlier) stays.
std::vector<Span> resolve_spans(std::vector<Span> spans) {
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) {
    const int32_t la = a.end - a.begin, lb = b.end - b.begin;
    return la != lb ? la > lb : a.begin < b.begin;
  });
  std::vector<Span> kept;
  for (const Span& s : spans) {
    if (s.end <= s.begin) continue;
    bool overlap = false;
    for (const Span& k : kept) overlap |= s.begin < k.end && k.begin < s.end;
    if (!overlap) kept.push_back(s);
  }
  std::sort(kept.begin(), kept.end());
  return kept;
}

// Every token run whose characters equal the item's non-whitespace characters (case-insensitive).
void match_item_exact(const std::string& item, const TokenChars& tc, std::vector<Span>& out) {
  std::string key;
  for (char c : normalize(item))
    if (!is_space(c)) key += to_lower(c);
  if (key.empty()) return;
  const size_t n = tc.keys.size();
  for (size_t i = 0; i < n; ++i) {
    if (tc.keys[i].empty()) continue;
    size_t got = 0;
    for (size_t j = i; j < n; ++j) {
      const std::string& k = tc.keys[j];
      if (got + k.size() > key.size() || key.compare(got, k.size(), k) != 0) break;
      got += k.size();
      if (got == key.size()) {
        if (!k.empty()) out.push_back({static_cast<int32_t>(i), static_cast<int32_t>(j + 1)});
        break;
      }
    }
  }
}

// An entity-list item mapped to spans; items that match nothing as written are retried as their
// parts: "X and Y", "X (chemical)", "the chemicals are X".
void match_item(std::string_view raw, const TokenChars& tc, std::vector<Span>& out, int depth = 0) {
  const std::string item(trim(raw));
  if (item.empty()) return;
  const size_t before = out.size();
  match_item_exact(item, tc, out);
  if (out.size() > before || depth >= 2) return;
  const std::string low = lower(item);
  for (std::string_view intro : {" are ", " is ", " include ", " includes ", " including ", " was ", " were "}) {
    const size_t at = low.rfind(intro);
    if (at != std::string::npos) {
      match_item(std::string_view(item).substr(at + intro.size()), tc, out, depth + 1);
      if (out.size() > before) return;
    }
  }
  for (std::string_view conj : {" and ", " or ", " & "}) {
    if (low.find(conj) == std::string::npos) continue;
    size_t start = 0;
    while (start <= item.size()) {
      size_t at = low.find(conj, start);
      if (at == std::string::npos) at = item.size();
      match_item(std::string_view(item).substr(start, at - start), tc, out, depth + 1);
      start = at + conj.size();
    }
    if (out.size() > before) return;
  }
  if (!item.empty() && item.back() == ')') {
    const size_t open = item.rfind(" (");
    if (open != std::string::npos) match_item(std::string_view(item).substr(0, open), tc, out, depth + 1);
  }
}

// Strings of a JSON entity list: ["a", "b"], {"entities": [...]}, [{"text": "a", "type": ...}].
void json_strings(const JNode& n, std::vector<std::string>& out, int depth = 0) {
  if (depth > 32) return;
  if (n.kind == JNode::scalar) {
    if (!n.text.empty()) out.push_back(n.text);
  } else if (n.kind == JNode::array) {
    for (const JNode& c : n.items) json_strings(c, out, depth + 1);
  } else {
    static const std::set<std::string> kTextKeys = {"text", "entity", "name", "mention", "span", "word",
                                                    "entities", "chemicals", "diseases", "value"};
    bool any_text_key = false;
    for (const auto& [k, v] : n.members) any_text_key |= kTextKeys.count(lower(trim(k))) > 0;
    for (const auto& [k, v] : n.members) {
      if (any_text_key) {
        if (kTextKeys.count(lower(trim(k)))) json_strings(v, out, depth + 1);
      } else {
        out.push_back(k);  // {"cocaine": "chemical"}
        if (v.kind != JNode::scalar) json_strings(v, out, depth + 1);
      }
    }
  }
}

// Items of an entity list written as JSON, lines (bullets, numbers), or comma/semicolon separated,
// optionally after a short header ("Entities: a, b"). `is_json` tells a JSON list was found.
std::vector<std::string> list_items(std::string_view raw, bool& is_json) {
  const std::string text = normalize(strip_fences(raw));
  std::vector<std::string> items;
  is_json = false;
  const size_t bracket = text.find_first_of("[{");
  if (bracket != std::string::npos) {
    LenientJson parser(text, bracket);
    const JNode node = parser.value(0);
    json_strings(node, items);
    if (!items.empty() || (node.kind == JNode::array && trim(text).substr(0, 1) == "[")) {
      is_json = true;
      return items;
    }
  }
  size_t i = 0;
  while (i < text.size()) {
    size_t nl = text.find('\n', i);
    if (nl == std::string::npos) nl = text.size();
    std::string line(trim(std::string_view(text).substr(i, nl - i)));
    i = nl + 1;
    // markdown emphasis and code marks carry no meaning in a list
    std::string clean;
    for (char c : line)
      if (c != '`' && c != '*') clean += c;
    std::string_view l = trim(clean);
    // bullets: "-", "•", "+", "1.", "1)", "(1)"
    if (l.substr(0, 3) == "\xE2\x80\xA2") l.remove_prefix(3);
    if (!l.empty() && (l[0] == '-' || l[0] == '+') && l.size() > 1 && l[1] == ' ') l.remove_prefix(1);
    {
      size_t d = 0;
      const bool paren = !l.empty() && l[0] == '(';
      if (paren) d = 1;
      const size_t digits_at = d;
      while (d < l.size() && l[d] >= '0' && l[d] <= '9') ++d;
      if (d > digits_at && d < l.size() && (l[d] == '.' || l[d] == ')') && (d + 1 == l.size() || l[d + 1] == ' '))
        l.remove_prefix(d + 1);
    }
    l = trim(l);
    if (l.empty()) continue;
    // "Entities: a, b" (a header of at most 4 words); a header alone is skipped
    const size_t colon = l.find(':');
    if (colon != std::string_view::npos && words_of(l.substr(0, colon)).size() <= 4 &&
        l.substr(0, colon).find(',') == std::string_view::npos) {
      l = trim(l.substr(colon + 1));
      if (l.empty()) continue;
    }
    // split on ';' always, on ',' outside brackets and not between digits ("10,11-dihydro")
    int bracket_depth = 0;
    size_t start = 0;
    for (size_t k = 0; k <= l.size(); ++k) {
      const char c = k < l.size() ? l[k] : ';';
      if (c == '(' || c == '[') ++bracket_depth;
      if ((c == ')' || c == ']') && bracket_depth > 0) --bracket_depth;
      bool split = c == ';' && (k == l.size() || bracket_depth == 0);
      if (c == ',' && bracket_depth == 0) {
        const bool digits = k > 0 && k + 1 < l.size() && l[k - 1] >= '0' && l[k - 1] <= '9' &&
                            l[k + 1] >= '0' && l[k + 1] <= '9';
        split = !digits;
      }
      if (k == l.size()) split = true;
      if (!split) continue;
      std::string_view it = trim(l.substr(start, k - start));
      start = k + 1;
      // quotes, a final period, a leading "and"/"or"
      while (!it.empty() && (it.front() == '"' || it.front() == '\'')) it.remove_prefix(1);
      while (!it.empty() && (it.back() == '"' || it.back() == '\'' || it.back() == '.')) it.remove_suffix(1);
      it = trim(it);
      for (std::string_view conj : {"and ", "or "}) {
        if (it.size() > conj.size() && lower(it.substr(0, conj.size())) == conj) it = trim(it.substr(conj.size()));
      }
      if (!it.empty()) items.emplace_back(it);
    }
  }
  return items;
}

Prediction ner_from_items(const std::vector<std::string>& items, const TokenChars& tc) {
  Prediction p;
  std::vector<Span> spans;
  for (const std::string& it : items) match_item(it, tc, spans);
  if (spans.empty()) return p;
  p.parsed = true;
  p.spans = resolve_spans(std::move(spans));
  return p;
}

Prediction parse_ner_impl(std::string_view output, const std::vector<std::string>& tokens) {
  Prediction none;
  if (trim(output).empty()) return none;
  const TokenChars tc = token_chars(tokens);
  const Markup mk = parse_markup(output);

  // Output characters (non-whitespace, lowercase), their marking element and byte offset in plain.
  std::string o;
  std::vector<int32_t> o_elem;
  std::vector<uint8_t> o_marked;
  std::vector<size_t> o_pos;
  {
    size_t e = 0;
    for (size_t i = 0; i < mk.plain.size(); ++i) {
      while (e < mk.elements.size() && mk.elements[e].end <= i) ++e;
      if (is_space(mk.plain[i])) continue;
      const bool in = e < mk.elements.size() && mk.elements[e].begin <= i && i < mk.elements[e].end;
      o += to_lower(mk.plain[i]);
      o_elem.push_back(in ? static_cast<int32_t>(e) : -1);
      o_marked.push_back(in ? 1 : 0);
      o_pos.push_back(i);
    }
  }

  if (!mk.elements.empty()) {
    const Alignment al = align_fitting(tc.chars, o, o_marked);
    // The output reproduces the sentence when half of it aligns, or when the unmarked text between
    // the marks does (a copy cut short by the token limit); a list of marked names does neither.
    const size_t n_chars = tc.chars.size();
    if (al.coverage >= 0.5 || (al.unmarked_in_runs >= 8 && 5 * al.unmarked_in_runs >= n_chars)) {
      // The output reproduces the sentence: project the marks. A token belongs to an element when
      // the element covers MORE THAN HALF of the token's characters (so one altered or dropped
      // character does not lose a token, and a stray marked character does not pull in a
      // neighbour); the entity is the token range from the first to the last such token.
      const size_t n_tok = tokens.size();
      std::vector<std::map<int32_t, int32_t>> count(n_tok);
      for (size_t k = 0; k < tc.chars.size(); ++k) {
        if (al.match[k] < 0) continue;
        const int32_t e = o_elem[static_cast<size_t>(al.match[k])];
        if (e >= 0) ++count[static_cast<size_t>(tc.token[k])][e];
      }
      std::map<int32_t, Span> range;  // element -> token range
      for (size_t t = 0; t < n_tok; ++t) {
        for (const auto& [e, c] : count[t]) {
          if (2 * static_cast<size_t>(c) <= tc.keys[t].size()) continue;
          auto it = range.find(e);
          if (it == range.end()) {
            range[e] = {static_cast<int32_t>(t), static_cast<int32_t>(t + 1)};
          } else {
            it->second.end = static_cast<int32_t>(t + 1);
          }
        }
      }
      Prediction p;
      p.parsed = true;
      std::vector<Span> spans;
      for (const auto& [e, s] : range) spans.push_back(s);
      p.spans = resolve_spans(std::move(spans));
      return p;
    }
    // Marked output that is not the sentence: the marked texts are the entity list (and failing
    // that, the whole text: "**Chemicals:** cocaine, diazepam").
    std::vector<std::string> items;
    for (const auto& el : mk.elements) items.push_back(mk.plain.substr(el.begin, el.end - el.begin));
    Prediction p = ner_from_items(items, tc);
    if (p.parsed) return p;
    // fall through: perhaps a list in plain text with a bold header
  }

  // No usable markup. The sentence copied as is means no entities, unless a list follows it.
  std::vector<uint8_t> unmarked(o.size(), 0);
  const Alignment al = mk.elements.empty() ? align_fitting(tc.chars, o, unmarked) : Alignment{};
  if (al.coverage >= 0.8) {
    int64_t lo = -1, hi = -1;
    for (int64_t m : al.match) {
      if (m < 0) continue;
      if (lo < 0) lo = m;
      hi = m;
    }
    std::string rest;
    if (lo >= 0) {
      rest = mk.plain.substr(0, o_pos[static_cast<size_t>(lo)]) + "\n" +
             mk.plain.substr(o_pos[static_cast<size_t>(hi)] + 1);
    }
    bool is_json = false;
    Prediction p = ner_from_items(list_items(rest, is_json), tc);
    p.parsed = true;
    return p;
  }
  if (explicit_none(mk.plain)) {
    Prediction p;
    p.parsed = true;
    return p;
  }
  bool is_json = false;
  const std::vector<std::string> items = list_items(mk.plain, is_json);
  if (is_json && items.empty()) {
    Prediction p;  // "[]"
    p.parsed = true;
    return p;
  }
  return ner_from_items(items, tc);
}

// ---------------------------------------------------------------------------------------------
// Relation

Prediction one_label(const std::vector<std::string>& labels, int idx) {
  Prediction p;
  if (idx < 0 || static_cast<size_t>(idx) >= labels.size()) return p;
  p.parsed = true;
  p.labels = {labels[static_cast<size_t>(idx)]};
  return p;
}

Prediction parse_relation_impl(std::string_view raw, const ParseContext& ctx) {
  if (ctx.labels.empty() || trim(raw).empty()) return {};
  const std::string text = normalize(raw);
  const std::vector<Pattern> patterns = label_patterns(ctx.labels, ctx.aliases);
  ChooseOptions opt;
  opt.marker_keywords = {"answer", "relation", "relationship", "label", "classification", "class",
                         "category", "type", "output", "prediction"};
  const int idx = choose_label(text, patterns, opt);
  if (idx >= 0) return one_label(ctx.labels, idx);
  // Label sets sharing a first word (DDI-*): a short answer may name only the rest ("mechanism").
  if (ctx.labels.size() >= 2 && words_of(text).size() <= 5) {
    std::string head;
    std::vector<Pattern> suffixes;
    bool shared = true;
    for (size_t i = 0; i < ctx.labels.size() && shared; ++i) {
      const std::vector<Word> w = words_of(normalize(ctx.labels[i]));
      if (w.size() < 2 || (i > 0 && w[0].text != head)) {
        shared = false;
        break;
      }
      head = w[0].text;
      std::string key;
      for (size_t k = 1; k < w.size(); ++k) key += w[k].text;
      suffixes.push_back({key, static_cast<int>(i)});
    }
    if (shared) return one_label(ctx.labels, choose_label(text, suffixes, opt));
  }
  return {};
}

// ---------------------------------------------------------------------------------------------
// Multi-label

struct LabelVotes {
  std::vector<int> value;  // per label: -1 unknown, 0, 1
  int recognized = 0;      // label keys with a readable value + label names in arrays
  explicit LabelVotes(size_t n) : value(n, -1) {}
  void set(int idx, int v) {
    int& cur = value[static_cast<size_t>(idx)];
    cur = std::max(cur, v);  // a label said once to be 1 stays 1
    ++recognized;
  }
};

int label_of_key(std::string_view key, const std::map<std::string, int>& keys) {
  const auto it = keys.find(phrase_key(key));
  return it == keys.end() ? -1 : it->second;
}

void interpret_json(const JNode& n, const std::map<std::string, int>& keys, LabelVotes& votes, int depth = 0) {
  if (depth > 32) return;
  if (n.kind == JNode::array) {
    for (const JNode& c : n.items) {
      if (c.kind == JNode::scalar) {
        const int idx = label_of_key(c.text, keys);
        if (idx >= 0) votes.set(idx, 1);
      } else {
        interpret_json(c, keys, votes, depth + 1);
      }
    }
  } else if (n.kind == JNode::object) {
    for (const auto& [k, v] : n.members) {
      const int idx = label_of_key(k, keys);
      if (idx >= 0) {
        if (v.kind == JNode::scalar) {
          const int t = truth_value(v.text);
          if (t >= 0) votes.set(idx, t);
        }
      } else if (v.kind != JNode::scalar) {
        interpret_json(v, keys, votes, depth + 1);
      } else if (v.quoted) {
        const int named = label_of_key(v.text, keys);  // {"topic": "Treatment"}
        if (named >= 0) votes.set(named, 1);
      }
    }
  }
}

// "Treatment: 1", "- Diagnosis: No", "Case Report = yes": the value after a mention, or -1.
int value_after(std::string_view text, size_t pos) {
  size_t p = pos;
  auto skip = [&](std::string_view chars) {
    while (p < text.size() && chars.find(text[p]) != std::string_view::npos) ++p;
  };
  skip(" \t\"'*`");
  if (p >= text.size()) return -1;
  if (text[p] == ':' || text[p] == '=') {
    ++p;
  } else if (text.compare(p, 2, "->") == 0) {
    p += 2;
  } else if (text.compare(p, 3, "\xE2\x86\x92") == 0) {
    p += 3;
  } else if (text[p] == '-' && p + 1 < text.size() && text[p + 1] == ' ') {
    ++p;
  } else {
    return -1;
  }
  skip(" \t\"'*`");
  size_t e = p;
  while (e < text.size() && text[e] != '\n' && text[e] != ',' && text[e] != ';' && text[e] != '}') ++e;
  const std::string_view val = trim(text.substr(p, e - p));
  // only a short value ("1", "yes", "0 (not related)"), not a sentence
  const std::vector<Word> w = words_of(val);
  if (w.empty()) return truth_value(val);
  return truth_value(text.substr(p, w[0].end - p));
}

Prediction parse_multilabel_impl(std::string_view raw, const ParseContext& ctx) {
  if (trim(raw).empty()) return {};
  const std::string text = normalize(raw);
  std::map<std::string, int> keys;
  for (const Pattern& p : label_patterns(ctx.labels, ctx.aliases))
    if (!p.key.empty()) keys.emplace(p.key, p.label);
  auto finish = [&](const LabelVotes& v) {
    Prediction p;
    p.parsed = true;
    for (size_t i = 0; i < ctx.labels.size(); ++i)
      if (v.value[i] == 1) p.labels.push_back(ctx.labels[i]);
    return p;
  };
  // 1. A JSON object or array: the first one that names a label with a readable value.
  {
    int attempts = 0;
    for (size_t at = text.find_first_of("{["); at != std::string::npos && attempts < 64;
         at = text.find_first_of("{[", at + 1), ++attempts) {
      LenientJson parser(text, at);
      const JNode node = parser.value(0);
      LabelVotes votes(ctx.labels.size());
      interpret_json(node, keys, votes);
      if (votes.recognized > 0) return finish(votes);
    }
  }
  // 2. Label names in the text: "Treatment: 1" lines or bare mentions.
  const std::vector<Pattern> patterns = label_patterns(ctx.labels, ctx.aliases);
  const std::vector<Mention> ms = find_mentions(text, words_of(text), patterns);
  LabelVotes votes(ctx.labels.size());
  std::set<int> bare;
  int valued = 0;
  for (const Mention& m : ms) {
    if (m.negated) {
      votes.set(m.label, 0);
      continue;
    }
    const int v = value_after(text, m.end);
    if (v >= 0) {
      votes.set(m.label, v);
      ++valued;
    } else {
      bare.insert(m.label);
      votes.set(m.label, 1);
    }
  }
  if (ms.empty()) {
    if (explicit_none(text)) return finish(votes);
    return {};
  }
  // Every label named without a value: the label list echoed, not an answer.
  if (valued == 0 && ctx.labels.size() >= 3 && bare.size() == ctx.labels.size()) return {};
  return finish(votes);
}

// ---------------------------------------------------------------------------------------------
// QA

int letter_label(char c, const std::vector<std::string>& labels) {
  const char u = to_upper(c);
  for (size_t i = 0; i < labels.size(); ++i)
    if (labels[i].size() == 1 && to_upper(labels[i][0]) == u) return static_cast<int>(i);
  return -1;
}

bool letter_mode(const std::vector<std::string>& labels) {
  if (labels.empty()) return false;
  for (const std::string& l : labels)
    if (l.size() != 1 || !is_alpha(l[0])) return false;
  return true;
}

// The option whose full text is `text` (ignoring case, spacing, punctuation), or -1.
int option_exact(std::string_view text, const ParseContext& ctx) {
  const std::string key = phrase_key(text);
  if (key.empty()) return -1;
  for (size_t i = 0; i < ctx.option_texts.size() && i < ctx.labels.size(); ++i)
    if (phrase_key(ctx.option_texts[i]) == key) return static_cast<int>(i);
  return -1;
}

// An option letter at text[pos]: "B", "(B)", "**B**", "B.", "B)", "B: ...", "Option B", "[B]".
// The article "A" ("A patient with ...", "A 45-year-old") is not a letter, unless the words after
// it are option A's own text. A letter inside a word or compound ("B12", "B-cell") is not one.
int read_letter(std::string_view text, size_t pos, const ParseContext& ctx) {
  size_t p = pos;
  bool wrapped = false;
  while (p < text.size() && std::string_view(" \t*_([{\"'`<#>-").find(text[p]) != std::string_view::npos) {
    if (text[p] == '(' || text[p] == '[' || text[p] == '*' || text[p] == '{') wrapped = true;
    ++p;
  }
  for (std::string_view word : {"option", "choice"}) {
    if (p + word.size() <= text.size() && lower(text.substr(p, word.size())) == word &&
        (p + word.size() == text.size() || !is_alnum(text[p + word.size()]))) {
      p += word.size();
      while (p < text.size() && std::string_view(" \t*_([").find(text[p]) != std::string_view::npos) ++p;
      wrapped = true;
      break;
    }
  }
  if (p >= text.size() || !is_alpha(text[p])) return -1;
  const size_t q = p + 1;
  if (q < text.size() && is_alnum(text[q])) return -1;
  if (q + 1 < text.size() && (text[q] == '-' || text[q] == '/' || text[q] == '\'') && is_alnum(text[q + 1]))
    return -1;
  const int idx = letter_label(text[p], ctx.labels);
  if (idx < 0) return -1;
  const bool followed_by_word = q + 1 < text.size() && (text[q] == ' ' || text[q] == '\t') && is_alnum(text[q + 1]);
  if (!wrapped && followed_by_word) {
    if (to_upper(text[p]) == 'A' || !is_upper(text[p])) {
      // an article, or a lowercase word; only option A's own text after it makes it a letter
      const size_t ia = static_cast<size_t>(idx);
      if (ia >= ctx.option_texts.size()) return -1;
      const std::string opt = phrase_key(ctx.option_texts[ia]);
      const std::string rest = phrase_key(text.substr(q));
      if (opt.empty() || rest.compare(0, opt.size(), opt) != 0) return -1;
    }
  }
  return idx;
}

struct LetterMention {
  int label;
  size_t pos;
  bool line_start;
};

// Explicit letter mentions anywhere: "Option B", "choice (C)", "(B)", "[B]", "**B**", and at a line
// start "B.", "B)", "B:" or "B" alone.
std::vector<LetterMention> letter_mentions(std::string_view text, const ParseContext& ctx) {
  std::vector<LetterMention> out;
  const std::string low = lower(text);
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (!is_alpha(c)) continue;
    if (i > 0 && is_alnum(text[i - 1])) continue;
    if (i + 1 < text.size() && is_alnum(text[i + 1])) continue;
    const int idx = letter_label(c, ctx.labels);
    if (idx < 0) continue;
    const char prev = i > 0 ? text[i - 1] : '\n';
    const char next = i + 1 < text.size() ? text[i + 1] : '\n';
    bool ok = false, line_start = false;
    // "option B" / "choice (B)" / "options: B"
    {
      size_t b = i;
      while (b > 0 && std::string_view(" \t(*:").find(text[b - 1]) != std::string_view::npos && i - b < 3) --b;
      for (std::string_view w : {"option", "choice", "options"}) {
        if (b >= w.size() && low.compare(b - w.size(), w.size(), w) == 0 &&
            (b == w.size() || !is_alnum(low[b - w.size() - 1])) && b < i)
          ok = true;
      }
    }
    if (is_upper(c)) {
      if ((prev == '(' && next == ')') || (prev == '[' && next == ']')) ok = true;
      if (i >= 2 && text.compare(i - 2, 2, "**") == 0 && text.compare(i + 1, 2, "**") == 0) ok = true;
      size_t b = i;
      while (b > 0 && std::string_view(" \t-*#>").find(text[b - 1]) != std::string_view::npos) --b;
      if (b == 0 || text[b - 1] == '\n') {
        if (next == '.' || next == ')' || next == ':' || next == '\n' || next == '\r' || next == '*' ||
            i + 1 == text.size()) {
          ok = true;
          line_start = true;
        }
      }
    }
    if (ok) out.push_back({idx, i, line_start});
  }
  return out;
}

Prediction parse_qa_letters(std::string_view text, const ParseContext& ctx) {
  auto first_line = [](std::string_view s) {
    s = trim(s);
    const size_t nl = s.find('\n');
    return trim(nl == std::string_view::npos ? s : s.substr(0, nl));
  };
  // 1. answer markers, the last one that names a letter or an option's text
  const std::vector<size_t> markers = find_markers(text, {"answer", "option", "choice"});
  for (auto it = markers.rbegin(); it != markers.rend(); ++it) {
    size_t p = *it;
    while (p < text.size() && is_space(text[p])) ++p;
    int idx = read_letter(text, p, ctx);
    if (idx < 0) idx = option_exact(first_line(text.substr(p)), ctx);
    if (idx >= 0) return one_label(ctx.labels, idx);
  }
  const std::vector<LetterMention> mentions = letter_mentions(text, ctx);
  {  // 2. the options echoed one per line ("A. ...\nB. ...\nC. ..."): no answer
    std::set<int> at_line_start;
    for (const LetterMention& m : mentions)
      if (m.line_start) at_line_start.insert(m.label);
    if (at_line_start.size() >= 3) return {};
  }
  // 3. exactly an option's text
  if (int idx = option_exact(text, ctx); idx >= 0) return one_label(ctx.labels, idx);
  if (int idx = option_exact(first_line(text), ctx); idx >= 0) return one_label(ctx.labels, idx);
  // 4. a letter opening the output
  const std::string_view t = trim(text);
  if (int idx = read_letter(t, 0, ctx); idx >= 0) return one_label(ctx.labels, idx);
  // 5. explicit mentions
  {
    std::set<int> distinct;
    int first = -1;
    for (const LetterMention& m : mentions) {
      if (negated_at(text, m.pos, 0)) continue;
      if (first < 0) first = m.label;
      distinct.insert(m.label);
    }
    if (distinct.size() >= 3) return {};
    if (first >= 0) return one_label(ctx.labels, first);
  }
  // 6. one option's text inside the output
  {
    std::vector<Pattern> opts;
    for (size_t i = 0; i < ctx.option_texts.size() && i < ctx.labels.size(); ++i) {
      std::string key = phrase_key(ctx.option_texts[i]);
      if (key.size() >= 3) opts.push_back({std::move(key), static_cast<int>(i)});
    }
    std::set<int> found;
    for (const Mention& m : find_mentions(text, words_of(text), opts))
      if (!m.negated) found.insert(m.label);
    if (found.size() == 1) return one_label(ctx.labels, *found.begin());
  }
  // 7. a short answer with one standalone capital letter ("I would choose C.")
  const std::vector<Word> w = words_of(text);
  if (w.size() <= 12) {
    std::set<int> found;
    for (const Word& x : w) {
      if (x.text.size() != 1 || !is_upper(text[x.begin])) continue;
      const bool article = to_upper(text[x.begin]) == 'A' && x.end + 1 < text.size() && text[x.end] == ' ' &&
                           is_alnum(text[x.end + 1]);
      if (article) continue;
      const int idx = letter_label(text[x.begin], ctx.labels);
      if (idx >= 0) found.insert(idx);
    }
    if (found.size() == 1) return one_label(ctx.labels, *found.begin());
  }
  return {};
}

Prediction parse_qa_impl(std::string_view raw, const ParseContext& ctx) {
  if (ctx.labels.empty() || trim(raw).empty()) return {};
  const std::string text = normalize(raw);
  if (letter_mode(ctx.labels)) return parse_qa_letters(text, ctx);
  // Word answers (yes / no / maybe): markers win, then the first decisive mention.
  ChooseOptions opt;
  opt.marker_keywords = {"answer", "decision", "output", "conclusion"};
  opt.alternatives = true;
  const int idx = choose_label(text, label_patterns(ctx.labels, ctx.aliases), opt);
  if (idx >= 0) return one_label(ctx.labels, idx);
  if (int e = option_exact(text, ctx); e >= 0) return one_label(ctx.labels, e);
  return {};
}

template <typename F>
Prediction guarded(F&& f) {
  try {
    return f();
  } catch (...) {
    return {};
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Public API

std::string_view final_answer_part(std::string_view output) {
  try {
    const std::vector<size_t> markers = find_markers(output, {"answer", "output"});
    if (!markers.empty()) {
      const std::string_view rest = trim(output.substr(markers.back()));
      if (!rest.empty()) return rest;
    }
    std::string_view s = trim(output);
    const size_t nl = s.rfind('\n');
    return nl == std::string_view::npos ? s : trim(s.substr(nl + 1));
  } catch (...) {
    return trim(output);
  }
}

Prediction parse_ner(std::string_view output, const std::vector<std::string>& tokens) {
  return guarded([&] { return parse_ner_impl(output, tokens); });
}

Prediction parse_relation(std::string_view output, const ParseContext& ctx) {
  return guarded([&] { return parse_relation_impl(output, ctx); });
}

Prediction parse_multilabel(std::string_view output, const ParseContext& ctx) {
  return guarded([&] { return parse_multilabel_impl(output, ctx); });
}

Prediction parse_qa(std::string_view output, const ParseContext& ctx) {
  return guarded([&] { return parse_qa_impl(output, ctx); });
}

Prediction parse_output(TaskFamily family, std::string_view output, const ParseContext& ctx) {
  auto parse = [&](std::string_view text) -> Prediction {
    switch (family) {
      case TaskFamily::ner:
        return parse_ner(text, ctx.tokens);
      case TaskFamily::relation:
        return parse_relation(text, ctx);
      case TaskFamily::multilabel:
        return parse_multilabel(text, ctx);
      case TaskFamily::qa:
        return parse_qa(text, ctx);
    }
    return {};
  };
  if (ctx.chain_of_thought) {
    const std::string_view part = final_answer_part(output);
    Prediction p = parse(part);
    if (p.parsed || part.size() == output.size()) return p;
  }
  return parse(output);
}

std::string render_ner_html(const std::vector<std::string>& tokens, const std::vector<Span>& spans,
                            std::string_view entity_class) {
  std::vector<Span> sorted = spans;
  std::sort(sorted.begin(), sorted.end());
  const auto n = static_cast<int32_t>(tokens.size());
  std::vector<int> open_at(tokens.size(), -1);  // token -> span end, for spans kept
  int32_t last_end = 0;
  for (const Span& s : sorted) {
    if (s.begin < last_end || s.begin < 0 || s.end > n || s.end <= s.begin) continue;
    open_at[static_cast<size_t>(s.begin)] = s.end;
    last_end = s.end;
  }
  std::string out;
  int32_t close_at = -1;
  for (int32_t t = 0; t < n; ++t) {
    if (t > 0) out += ' ';
    if (open_at[static_cast<size_t>(t)] >= 0) {
      out += "<span class=\"";
      out += entity_class;
      out += "\">";
      close_at = open_at[static_cast<size_t>(t)];
    }
    out += tokens[static_cast<size_t>(t)];
    if (t + 1 == close_at) {
      out += "</span>";
      close_at = -1;
    }
  }
  return out;
}

std::string render_multilabel_json(const std::vector<std::string>& label_set,
                                   const std::vector<std::string>& chosen) {
  if (label_set.empty()) return "{}";
  std::string out = "{\n";
  for (size_t i = 0; i < label_set.size(); ++i) {
    const bool on = std::find(chosen.begin(), chosen.end(), label_set[i]) != chosen.end();
    out += "  " + nlohmann::json(label_set[i]).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) +
           ": " + (on ? "1" : "0");
    out += i + 1 < label_set.size() ? ",\n" : "\n";
  }
  out += "}";
  return out;
}

}  // namespace bioquant::eval
