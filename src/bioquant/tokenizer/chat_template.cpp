// Jinja2-subset engine for Hugging Face chat templates. Layout, top to bottom:
//   1. text helpers (UTF-8, Python str semantics, Python repr/str of values, json.dumps)
//   2. the value model (JSON + undefined + namespace/loop objects + callables)
//   3. lexer (jinja2's whitespace rules: trim_blocks, lstrip_blocks, '-' and '+' markers)
//   4. parser (jinja2's grammar and operator precedence) into a small AST
//   5. evaluator: Python operators, filters, tests, methods, statements
// Semantics follow jinja2 3.1 in transformers' ImmutableSandboxedEnvironment; comments say where a
// rule looks odd but is what jinja2 (or Python) does.
#include "bioquant/tokenizer/chat_template.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <unordered_map>

#include "bioquant/core/error.h"
#include "bioquant/tokenizer/unicode.h"

namespace bioquant {

namespace {

using Json = nlohmann::ordered_json;
using unicode::append_utf8;

constexpr size_t kMaxOutput = size_t{256} << 20;  // guard against 'x' * 10**12 and friends
constexpr int kMaxCallDepth = 256;                // recursive macros must not overflow the stack
constexpr int64_t kMaxRange = 100000;             // jinja2's sandbox MAX_RANGE

// Runtime failure before a line number is attached (the statement that ran it adds one).
struct Failure {
  std::string message;
};
[[noreturn]] void fail(std::string message) { throw Failure{std::move(message)}; }

// One-line rendering of template text for error messages.
std::string one_line(std::string_view s, size_t max_len = 40) {
  std::string out;
  for (char c : s.substr(0, max_len)) {
    if (c == '\n') out += "\\n";
    else if (c == '\r') out += "\\r";
    else if (c == '\t') out += "\\t";
    else out += c;
  }
  if (s.size() > max_len) out += "...";
  return out;
}

// ---------------------------------------------------------------------------------------------------
// 1. Text helpers
// ---------------------------------------------------------------------------------------------------

std::u32string to_u32(std::string_view s) {
  std::u32string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    int n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + n > s.size()) {  // invalid byte: keep going with U+FFFD
      out += U'\uFFFD';
      ++i;
      continue;
    }
    char32_t cp = n == 1 ? c : n == 2 ? (c & 0x1F) : n == 3 ? (c & 0x0F) : (c & 0x07);
    for (int k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
    out += cp;
    i += n;
  }
  return out;
}

std::string to_utf8(std::u32string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char32_t cp : s) append_utf8(out, cp);
  return out;
}

// Python's str.isspace() (what strip(), split() and jinja2's trim use).
bool py_isspace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000;
}

// Line boundaries of Python's str.splitlines().
bool py_is_linebreak(char32_t c) {
  return c == '\n' || c == '\r' || c == 0x0B || c == 0x0C || (c >= 0x1C && c <= 0x1E) || c == 0x85 ||
         c == 0x2028 || c == 0x2029;
}

// str.isprintable(), approximately: control, format, separator and private-use code points.
bool py_isprintable(char32_t c) {
  if (c < 0x20 || (c >= 0x7F && c <= 0xA0) || c == 0xAD) return false;
  if (c == 0x1680 || c == 0x180E || (c >= 0x2000 && c <= 0x200F) || (c >= 0x2028 && c <= 0x202F)) return false;
  if ((c >= 0x205F && c <= 0x206F) || c == 0x3000 || (c >= 0xD800 && c <= 0xF8FF) || c == 0xFEFF) return false;
  if ((c >= 0xFFF9 && c <= 0xFFFB) || (c >= 0xE0000 && c <= 0xE007F) || c >= 0xF0000) return false;
  return true;
}

// Simple case mapping (Python's str.upper/lower) for ASCII, Latin-1, Latin Extended-A, Greek and
// Cyrillic; other scripts are left as they are. 'ß'.upper() is "SS" (see py_upper).
char32_t to_upper_cp(char32_t c) {
  if (c < 0x80) return c >= 'a' && c <= 'z' ? c - 32 : c;
  if (c == 0xB5) return 0x39C;   // micro sign -> Greek capital mu
  if (c == 0xFF) return 0x178;
  if (c >= 0xE0 && c <= 0xFE && c != 0xF7) return c - 0x20;
  if (c == 0x131) return 'I';
  if (c == 0x17F) return 'S';
  if ((c >= 0x100 && c <= 0x137) || (c >= 0x14A && c <= 0x177)) return c & ~char32_t{1};
  if ((c >= 0x139 && c <= 0x148) || (c >= 0x179 && c <= 0x17E)) return (c & 1) ? c : c - 1;
  if (c == 0x3C2) return 0x3A3;  // final sigma
  if (c >= 0x3B1 && c <= 0x3C9) return c - 0x20;
  if (c >= 0x430 && c <= 0x44F) return c - 0x20;
  if (c >= 0x450 && c <= 0x45F) return c - 0x50;
  return c;
}
char32_t to_lower_cp(char32_t c) {
  if (c < 0x80) return c >= 'A' && c <= 'Z' ? c + 32 : c;
  if (c >= 0xC0 && c <= 0xDE && c != 0xD7) return c + 0x20;
  if (c == 0x178) return 0xFF;
  if ((c >= 0x100 && c <= 0x137 && c != 0x130) || (c >= 0x14A && c <= 0x177)) return c | 1;
  if ((c >= 0x139 && c <= 0x148) || (c >= 0x179 && c <= 0x17E)) return (c & 1) ? c + 1 : c;
  if (c >= 0x391 && c <= 0x3A9 && c != 0x3A2) return c + 0x20;
  if (c >= 0x410 && c <= 0x42F) return c + 0x20;
  if (c >= 0x400 && c <= 0x40F) return c + 0x50;
  return c;
}
bool is_cased(char32_t c) { return to_upper_cp(c) != c || to_lower_cp(c) != c || c == 0xDF; }

std::string py_upper(std::string_view s) {
  std::string out;
  for (char32_t c : to_u32(s)) {
    if (c == 0xDF) out += "SS";
    else append_utf8(out, to_upper_cp(c));
  }
  return out;
}
std::string py_lower(std::string_view s) {
  std::string out;
  for (char32_t c : to_u32(s)) append_utf8(out, to_lower_cp(c));
  return out;
}
// str.capitalize(): first character upper, the rest lower.
std::string py_capitalize(std::string_view s) {
  std::u32string u = to_u32(s);
  std::string out;
  for (size_t i = 0; i < u.size(); ++i) {
    if (i == 0) out += py_upper(to_utf8(u.substr(0, 1)));
    else append_utf8(out, to_lower_cp(u[i]));
  }
  return out;
}
// str.title(): a cased character after an uncased one goes upper, the others lower.
std::string py_title(std::string_view s) {
  std::string out;
  bool prev_cased = false;
  for (char32_t c : to_u32(s)) {
    if (!prev_cased) out += py_upper(to_utf8(std::u32string(1, c)));
    else append_utf8(out, to_lower_cp(c));
    prev_cased = is_cased(c);
  }
  return out;
}

// str.strip / lstrip / rstrip: `chars` empty-optional means whitespace.
std::string py_strip(std::string_view s, const std::optional<std::string>& chars, bool left, bool right) {
  std::u32string u = to_u32(s);
  std::u32string set = chars ? to_u32(*chars) : std::u32string();
  auto strip_it = [&](char32_t c) { return chars ? set.find(c) != std::u32string::npos : py_isspace(c); };
  size_t b = 0, e = u.size();
  if (left)
    while (b < e && strip_it(u[b])) ++b;
  if (right)
    while (e > b && strip_it(u[e - 1])) --e;
  return to_utf8(std::u32string_view(u).substr(b, e - b));
}

// str.split(sep, maxsplit) and str.rsplit.
std::vector<std::string> py_split(std::string_view s, const std::optional<std::string>& sep, int64_t maxsplit,
                                  bool from_right) {
  std::vector<std::string> parts;
  if (sep) {
    if (sep->empty()) fail("empty separator");
    if (!from_right) {
      size_t pos = 0;
      while (maxsplit != 0) {
        size_t hit = s.find(*sep, pos);
        if (hit == std::string_view::npos) break;
        parts.emplace_back(s.substr(pos, hit - pos));
        pos = hit + sep->size();
        --maxsplit;
      }
      parts.emplace_back(s.substr(pos));
    } else {
      size_t end = s.size();
      while (maxsplit != 0 && end >= sep->size()) {
        size_t hit = s.rfind(*sep, end - sep->size());
        if (hit == std::string_view::npos) break;
        parts.emplace_back(s.substr(hit + sep->size(), end - hit - sep->size()));
        end = hit;
        --maxsplit;
      }
      parts.emplace_back(s.substr(0, end));
      std::reverse(parts.begin(), parts.end());
    }
    return parts;
  }
  // Whitespace mode: runs of whitespace separate, empty strings never appear.
  std::u32string u = to_u32(s);
  if (!from_right) {
    size_t i = 0;
    while (true) {
      while (i < u.size() && py_isspace(u[i])) ++i;
      if (i >= u.size()) break;
      if (maxsplit == 0) {  // the rest, as it is (only the leading whitespace went)
        parts.push_back(to_utf8(std::u32string_view(u).substr(i)));
        break;
      }
      size_t j = i;
      while (j < u.size() && !py_isspace(u[j])) ++j;
      parts.push_back(to_utf8(std::u32string_view(u).substr(i, j - i)));
      i = j;
      --maxsplit;
    }
  } else {
    size_t i = u.size();
    while (true) {
      while (i > 0 && py_isspace(u[i - 1])) --i;
      if (i == 0) break;
      if (maxsplit == 0) {
        parts.push_back(to_utf8(std::u32string_view(u).substr(0, i)));
        break;
      }
      size_t j = i;
      while (j > 0 && !py_isspace(u[j - 1])) --j;
      parts.push_back(to_utf8(std::u32string_view(u).substr(j, i - j)));
      i = j;
      --maxsplit;
    }
    std::reverse(parts.begin(), parts.end());
  }
  return parts;
}

std::vector<std::string> py_splitlines(std::string_view s, bool keepends) {
  std::u32string u = to_u32(s);
  std::vector<std::string> lines;
  size_t start = 0;
  for (size_t i = 0; i < u.size(); ++i) {
    if (!py_is_linebreak(u[i])) continue;
    size_t end = i;
    if (u[i] == '\r' && i + 1 < u.size() && u[i + 1] == '\n') ++i;
    lines.push_back(to_utf8(std::u32string_view(u).substr(start, (keepends ? i + 1 : end) - start)));
    start = i + 1;
  }
  if (start < u.size()) lines.push_back(to_utf8(std::u32string_view(u).substr(start)));
  return lines;
}

// str.replace(old, new, count); an empty `old` inserts `new` between all characters, like Python.
std::string py_replace(std::string_view s, std::string_view old, std::string_view repl, int64_t count) {
  std::string out;
  if (old.empty()) {
    std::u32string u = to_u32(s);
    for (size_t i = 0; i <= u.size(); ++i) {
      if (count != 0) {
        out += repl;
        --count;
      }
      if (i < u.size()) append_utf8(out, u[i]);
    }
    return out;
  }
  size_t pos = 0;
  while (count != 0) {
    size_t hit = s.find(old, pos);
    if (hit == std::string_view::npos) break;
    out.append(s.substr(pos, hit - pos));
    out.append(repl);
    pos = hit + old.size();
    --count;
  }
  out.append(s.substr(pos));
  return out;
}

// markupsafe.escape
std::string html_escape(std::string_view s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&#34;"; break;
      case '\'': out += "&#39;"; break;
      default: out += c;
    }
  }
  return out;
}

// Python's repr(float): shortest round-trip digits, fixed notation for exponents in [-4, 16).
std::string py_float_repr(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  if (d == 0) return std::signbit(d) ? "-0.0" : "0.0";
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof(buf), d, std::chars_format::scientific);
  std::string sci(buf, res.ptr);
  std::string sign;
  if (sci[0] == '-') {
    sign = "-";
    sci.erase(0, 1);
  }
  size_t e_pos = sci.find('e');
  int exp10 = std::stoi(sci.substr(e_pos + 1));
  std::string digits;
  for (char c : sci.substr(0, e_pos))
    if (c != '.') digits += c;
  std::string out;
  if (exp10 >= -4 && exp10 < 16) {
    if (exp10 >= 0) {
      if (digits.size() <= static_cast<size_t>(exp10) + 1) {
        out = digits + std::string(exp10 + 1 - digits.size(), '0') + ".0";
      } else {
        out = digits.substr(0, exp10 + 1) + "." + digits.substr(exp10 + 1);
      }
    } else {
      out = "0." + std::string(-exp10 - 1, '0') + digits;
    }
  } else {
    out = digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    std::string e = std::to_string(std::abs(exp10));
    if (e.size() < 2) e = "0" + e;
    out += (exp10 < 0 ? "e-" : "e+") + e;
  }
  return sign + out;
}

// Python's repr(str).
std::string py_str_repr(std::string_view s) {
  bool has_single = s.find('\'') != std::string_view::npos;
  bool has_double = s.find('"') != std::string_view::npos;
  char quote = has_single && !has_double ? '"' : '\'';
  std::string out(1, quote);
  char hex[16];
  for (char32_t c : to_u32(s)) {
    if (c == static_cast<char32_t>(quote) || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\t') {
      out += "\\t";
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (!py_isprintable(c)) {
      if (c < 0x100) std::snprintf(hex, sizeof(hex), "\\x%02x", static_cast<unsigned>(c));
      else if (c < 0x10000) std::snprintf(hex, sizeof(hex), "\\u%04x", static_cast<unsigned>(c));
      else std::snprintf(hex, sizeof(hex), "\\U%08x", static_cast<unsigned>(c));
      out += hex;
    } else {
      append_utf8(out, c);
    }
  }
  out += quote;
  return out;
}

// json.dumps string escaping (ensure_ascii selects \uXXXX for everything outside ASCII).
void json_escape_into(std::string& out, std::string_view s, bool ensure_ascii) {
  char hex[16];
  out += '"';
  for (char32_t c : to_u32(s)) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20 || (ensure_ascii && c > 0x7E)) {
          if (c >= 0x10000) {  // surrogate pair, as Python writes it
            char32_t v = c - 0x10000;
            std::snprintf(hex, sizeof(hex), "\\u%04x\\u%04x", static_cast<unsigned>(0xD800 + (v >> 10)),
                          static_cast<unsigned>(0xDC00 + (v & 0x3FF)));
          } else {
            std::snprintf(hex, sizeof(hex), "\\u%04x", static_cast<unsigned>(c));
          }
          out += hex;
        } else {
          append_utf8(out, c);
        }
    }
  }
  out += '"';
}

int64_t json_int(const Json& j) {
  if (j.is_number_unsigned()) {
    uint64_t u = j.get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) fail("integer too large");
    return static_cast<int64_t>(u);
  }
  return j.get<int64_t>();
}

struct DumpOptions {
  bool ensure_ascii = false;
  std::optional<std::string> indent;  // json.dumps(indent=...) as a string of spaces (or the given str)
  std::string item_sep = ", ";
  std::string key_sep = ": ";
  bool sort_keys = false;
};

// json.dumps(x) with transformers' defaults (ensure_ascii=False).
void json_dump_into(std::string& out, const Json& j, const DumpOptions& opt, int level) {
  auto newline = [&](int lvl) {
    out += '\n';
    for (int i = 0; i < lvl; ++i) out += *opt.indent;
  };
  switch (j.type()) {
    case Json::value_t::null: out += "null"; break;
    case Json::value_t::boolean: out += j.get<bool>() ? "true" : "false"; break;
    case Json::value_t::number_integer: out += std::to_string(j.get<int64_t>()); break;
    case Json::value_t::number_unsigned: out += std::to_string(j.get<uint64_t>()); break;
    case Json::value_t::number_float: {
      double d = j.get<double>();
      if (std::isnan(d)) out += "NaN";
      else if (std::isinf(d)) out += d > 0 ? "Infinity" : "-Infinity";
      else out += py_float_repr(d);
      break;
    }
    case Json::value_t::string: json_escape_into(out, j.get_ref<const std::string&>(), opt.ensure_ascii); break;
    case Json::value_t::array: {
      if (j.empty()) {
        out += "[]";
        break;
      }
      out += '[';
      bool first = true;
      for (const Json& v : j) {
        if (!first) out += opt.item_sep;
        first = false;
        if (opt.indent) newline(level + 1);
        json_dump_into(out, v, opt, level + 1);
      }
      if (opt.indent) newline(level);
      out += ']';
      break;
    }
    case Json::value_t::object: {
      if (j.empty()) {
        out += "{}";
        break;
      }
      std::vector<std::pair<std::string, const Json*>> items;
      for (auto it = j.begin(); it != j.end(); ++it) items.emplace_back(it.key(), &it.value());
      if (opt.sort_keys)
        std::stable_sort(items.begin(), items.end(), [](auto& a, auto& b) { return a.first < b.first; });
      out += '{';
      bool first = true;
      for (auto& [k, v] : items) {
        if (!first) out += opt.item_sep;
        first = false;
        if (opt.indent) newline(level + 1);
        json_escape_into(out, k, opt.ensure_ascii);
        out += opt.key_sep;
        json_dump_into(out, *v, opt, level + 1);
      }
      if (opt.indent) newline(level);
      out += '}';
      break;
    }
    default: fail("Object of type Undefined is not JSON serializable");
  }
}

// Python's repr() of a JSON value (how lists and dicts print).
void py_repr_into(std::string& out, const Json& j) {
  switch (j.type()) {
    case Json::value_t::null: out += "None"; break;
    case Json::value_t::boolean: out += j.get<bool>() ? "True" : "False"; break;
    case Json::value_t::number_integer: out += std::to_string(j.get<int64_t>()); break;
    case Json::value_t::number_unsigned: out += std::to_string(j.get<uint64_t>()); break;
    case Json::value_t::number_float: out += py_float_repr(j.get<double>()); break;
    case Json::value_t::string: out += py_str_repr(j.get_ref<const std::string&>()); break;
    case Json::value_t::array: {
      out += '[';
      bool first = true;
      for (const Json& v : j) {
        if (!first) out += ", ";
        first = false;
        py_repr_into(out, v);
      }
      out += ']';
      break;
    }
    case Json::value_t::object: {
      out += '{';
      bool first = true;
      for (auto it = j.begin(); it != j.end(); ++it) {
        if (!first) out += ", ";
        first = false;
        out += py_str_repr(it.key());
        out += ": ";
        py_repr_into(out, it.value());
      }
      out += '}';
      break;
    }
    default: out += "Undefined";  // an undefined stored in a list (see to_json)
  }
}

// Python's str() of a JSON value: strings as they are, the rest as repr.
std::string py_str(const Json& j) {
  if (j.is_string()) return j.get<std::string>();
  std::string out;
  py_repr_into(out, j);
  return out;
}

const char* py_type_name(const Json& j) {
  switch (j.type()) {
    case Json::value_t::null: return "NoneType";
    case Json::value_t::boolean: return "bool";
    case Json::value_t::number_integer:
    case Json::value_t::number_unsigned: return "int";
    case Json::value_t::number_float: return "float";
    case Json::value_t::string: return "str";
    case Json::value_t::array: return "list";
    case Json::value_t::object: return "dict";
    default: return "Undefined";
  }
}

// ---------------------------------------------------------------------------------------------------
// 2. Values
// ---------------------------------------------------------------------------------------------------

struct Value;
struct Object;
struct Callable;
class Renderer;

struct CallArgs {
  std::vector<Value> positional;
  std::vector<std::pair<std::string, Value>> keyword;
};

struct Value {
  enum class Kind { Undefined, Data, Object, Callable };
  Kind kind = Kind::Undefined;
  Json data;                           // Kind::Data
  bool safe = false;                   // a markupsafe.Markup string (see add())
  std::shared_ptr<Object> object;      // Kind::Object: namespace() or loop
  std::shared_ptr<Callable> callable;  // Kind::Callable: macro, global function or bound method
  std::string hint;                    // Kind::Undefined: jinja2's message for misuse

  static Value undefined(std::string why) {
    Value v;
    v.hint = std::move(why);
    return v;
  }
  Value() = default;
  Value(Json j) : kind(Kind::Data), data(std::move(j)) {  // NOLINT: values are JSON by default
    if (data.is_discarded()) {  // an undefined stored in a list or dict (see to_json)
      kind = Kind::Undefined;
      hint = "an undefined value was stored in a list or dict";
    }
  }
  static Value markup(std::string s) {
    Value v{Json(std::move(s))};
    v.safe = true;
    return v;
  }

  bool is_undefined() const { return kind == Kind::Undefined; }
  bool is_data() const { return kind == Kind::Data; }
  bool is_string() const { return kind == Kind::Data && data.is_string(); }
  bool is_none() const { return kind == Kind::Data && data.is_null(); }
  const std::string& str() const { return data.get_ref<const std::string&>(); }
};

struct Object {
  bool is_namespace = false;  // assignable with {% set ns.attr = ... %}; loop objects are not
  std::vector<std::pair<std::string, Value>> attrs;
  Value* find(const std::string& name) {
    for (auto& [k, v] : attrs)
      if (k == name) return &v;
    return nullptr;
  }
  void set(const std::string& name, Value v) {
    if (Value* slot = find(name)) *slot = std::move(v);
    else attrs.emplace_back(name, std::move(v));
  }
};

struct Callable {
  std::string name;
  std::function<Value(Renderer&, CallArgs&)> fn;
};

// The Python type name jinja2's messages use.
std::string type_name(const Value& v) {
  switch (v.kind) {
    case Value::Kind::Undefined: return "Undefined";
    case Value::Kind::Data: return py_type_name(v.data);
    case Value::Kind::Object: return v.object->is_namespace ? "Namespace" : "LoopContext";
    case Value::Kind::Callable: return "function";
  }
  return "object";
}

[[noreturn]] void fail_undefined(const Value& v) { fail(v.hint.empty() ? "value is undefined" : v.hint); }

// Python truthiness; undefined is falsy.
bool truthy(const Value& v) {
  switch (v.kind) {
    case Value::Kind::Undefined: return false;
    case Value::Kind::Object:
    case Value::Kind::Callable: return true;
    case Value::Kind::Data: break;
  }
  const Json& j = v.data;
  switch (j.type()) {
    case Json::value_t::null: return false;
    case Json::value_t::boolean: return j.get<bool>();
    case Json::value_t::number_integer: return j.get<int64_t>() != 0;
    case Json::value_t::number_unsigned: return j.get<uint64_t>() != 0;
    case Json::value_t::number_float: return j.get<double>() != 0.0;
    case Json::value_t::string: return !j.get_ref<const std::string&>().empty();  // (json's empty() is false for "")
    case Json::value_t::array:
    case Json::value_t::object: return !j.empty();
    default: return true;
  }
}

// str(value) as jinja2 prints it: undefined is "", none is "None".
std::string to_str(const Value& v) {
  switch (v.kind) {
    case Value::Kind::Undefined: return "";
    case Value::Kind::Data: return py_str(v.data);
    case Value::Kind::Object: {
      std::string out = v.object->is_namespace ? "<Namespace {" : "<LoopContext {";
      bool first = true;
      for (auto& [k, a] : v.object->attrs) {
        if (!first) out += ", ";
        first = false;
        out += py_str_repr(k) + ": " + (a.is_data() ? (a.is_string() ? py_str_repr(a.str()) : py_str(a.data)) : to_str(a));
      }
      return out + "}>";
    }
    case Value::Kind::Callable: return "<function " + v.callable->name + ">";
  }
  return "";
}

// Stores a value inside a list or dict. Undefined is kept as a "discarded" JSON value, which reads
// back as undefined (Value's constructor); namespaces, loops and functions cannot be stored.
Json to_json(const Value& v) {
  if (v.is_undefined()) return Json(Json::value_t::discarded);
  if (!v.is_data()) fail("cannot store a " + type_name(v) + " in a list or dict");
  return v.data;
}

bool is_number(const Json& j) { return j.is_number() || j.is_boolean(); }  // Python: bool is an int
bool is_intlike(const Json& j) { return j.is_number_integer() || j.is_boolean(); }
int64_t as_int(const Json& j) { return j.is_boolean() ? (j.get<bool>() ? 1 : 0) : json_int(j); }
double as_double(const Json& j) {
  if (j.is_boolean()) return j.get<bool>() ? 1.0 : 0.0;
  if (j.is_number_float()) return j.get<double>();
  return static_cast<double>(json_int(j));
}

// Python ==.
bool py_equal(const Json& a, const Json& b) {
  if (is_number(a) && is_number(b)) {
    if (is_intlike(a) && is_intlike(b)) return as_int(a) == as_int(b);
    return as_double(a) == as_double(b);
  }
  if (a.type() != b.type()) return false;
  switch (a.type()) {
    case Json::value_t::null:
    case Json::value_t::discarded: return true;  // None == None, Undefined == Undefined
    case Json::value_t::string: return a.get_ref<const std::string&>() == b.get_ref<const std::string&>();
    case Json::value_t::array: {
      if (a.size() != b.size()) return false;
      for (size_t i = 0; i < a.size(); ++i)
        if (!py_equal(a[i], b[i])) return false;
      return true;
    }
    case Json::value_t::object: {  // dict equality ignores key order
      if (a.size() != b.size()) return false;
      for (auto it = a.begin(); it != a.end(); ++it) {
        auto other = b.find(it.key());
        if (other == b.end() || !py_equal(it.value(), *other)) return false;
      }
      return true;
    }
    default: return false;
  }
}

bool values_equal(const Value& a, const Value& b) {
  if (a.is_undefined() || b.is_undefined()) return a.is_undefined() && b.is_undefined();
  if (a.is_data() && b.is_data()) return py_equal(a.data, b.data);
  if (a.kind == Value::Kind::Object && b.kind == Value::Kind::Object) return a.object == b.object;
  if (a.kind == Value::Kind::Callable && b.kind == Value::Kind::Callable) return a.callable == b.callable;
  return false;
}

// Python <: numbers, strings (code point order = UTF-8 byte order) and lists.
int py_compare(const Json& a, const Json& b, const char* op) {
  if (is_number(a) && is_number(b)) {
    if (is_intlike(a) && is_intlike(b)) {
      int64_t x = as_int(a), y = as_int(b);
      return x < y ? -1 : x > y ? 1 : 0;
    }
    double x = as_double(a), y = as_double(b);
    if (std::isnan(x) || std::isnan(y)) return 2;  // every comparison with nan is false
    return x < y ? -1 : x > y ? 1 : 0;
  }
  if (a.is_string() && b.is_string()) {
    int c = a.get_ref<const std::string&>().compare(b.get_ref<const std::string&>());
    return c < 0 ? -1 : c > 0 ? 1 : 0;
  }
  if (a.is_array() && b.is_array()) {
    for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
      if (py_equal(a[i], b[i])) continue;
      return py_compare(a[i], b[i], op);
    }
    return a.size() < b.size() ? -1 : a.size() > b.size() ? 1 : 0;
  }
  fail(std::string("'") + op + "' not supported between instances of '" + py_type_name(a) + "' and '" +
       py_type_name(b) + "'");
}

// Python iteration: lists, dict keys, string characters; undefined iterates as empty (jinja2).
std::vector<Value> iterate(const Value& v) {
  std::vector<Value> items;
  if (v.is_undefined()) return items;
  if (!v.is_data()) fail("'" + type_name(v) + "' object is not iterable");
  const Json& j = v.data;
  if (j.is_array()) {
    for (const Json& x : j) items.emplace_back(x);
  } else if (j.is_object()) {
    for (auto it = j.begin(); it != j.end(); ++it) items.emplace_back(Json(it.key()));
  } else if (j.is_string()) {
    for (char32_t c : to_u32(j.get_ref<const std::string&>())) items.emplace_back(Json(to_utf8(std::u32string(1, c))));
  } else {
    fail("'" + std::string(py_type_name(j)) + "' object is not iterable");
  }
  return items;
}

int64_t length_of(const Value& v) {
  if (v.is_undefined()) return 0;
  if (v.is_data()) {
    if (v.data.is_string()) return static_cast<int64_t>(to_u32(v.str()).size());
    if (v.data.is_array() || v.data.is_object()) return static_cast<int64_t>(v.data.size());
  }
  fail("object of type '" + type_name(v) + "' has no len()");
}

Value make_list(const std::vector<Value>& items) {
  Json arr = Json::array();
  for (const Value& v : items) arr.push_back(to_json(v));
  return Value(std::move(arr));
}

// Python slice index normalisation (PySlice_AdjustIndices).
std::vector<int64_t> slice_indices(int64_t len, std::optional<int64_t> start, std::optional<int64_t> stop,
                                   std::optional<int64_t> step_opt) {
  int64_t step = step_opt.value_or(1);
  if (step == 0) fail("slice step cannot be zero");
  auto adjust = [&](std::optional<int64_t> i, int64_t dflt) {
    if (!i) return dflt;
    int64_t x = *i;
    if (x < 0) {
      x += len;
      if (x < 0) x = step < 0 ? -1 : 0;
    } else if (x >= len) {
      x = step < 0 ? len - 1 : len;
    }
    return x;
  };
  int64_t b = adjust(start, step < 0 ? len - 1 : 0);
  int64_t e = adjust(stop, step < 0 ? -1 : len);
  std::vector<int64_t> idx;
  if (step > 0)
    for (int64_t i = b; i < e; i += step) idx.push_back(i);
  else
    for (int64_t i = b; i > e; i += step) idx.push_back(i);
  return idx;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// 3. Lexer
// ---------------------------------------------------------------------------------------------------

namespace {

enum class Tok { Text, VarBegin, VarEnd, BlockBegin, BlockEnd, Name, String, Int, Float, Op, Eof };

struct Token {
  Tok type;
  std::string text;  // Text: the data; Name/Op: the spelling; String: the decoded value
  int line = 1;
  int64_t int_value = 0;
  double float_value = 0;
};

[[noreturn]] void syntax_error(int line, const std::string& message) {
  throw Error("chat template syntax error at line " + std::to_string(line) + ": " + message);
}

// Byte length of the Python-whitespace character (regex \s) at s[p], or 0.
size_t space_len(const std::string& s, size_t p) {
  if (p >= s.size()) return 0;
  unsigned char c = static_cast<unsigned char>(s[p]);
  if (c < 0x80) return py_isspace(c) ? 1 : 0;
  size_t n = (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
  std::u32string u = to_u32(std::string_view(s).substr(p, n));
  return u.size() == 1 && py_isspace(u[0]) ? n : 0;
}
bool is_name_start(char c) { return std::isalpha(static_cast<unsigned char>(c)) || c == '_'; }
bool is_name_char(char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; }
bool is_digit(char c) { return c >= '0' && c <= '9'; }

// A string literal's body the way jinja2 decodes it: non-ASCII characters become backslash escapes
// (encode("ascii", "backslashreplace")), then Python's "unicode-escape" codec decodes everything.
std::string decode_string_literal(std::string_view raw, int line) {
  std::string ascii;
  char hex[16];
  for (char32_t c : to_u32(raw)) {
    if (c < 0x80) ascii += static_cast<char>(c);
    else if (c < 0x100) std::snprintf(hex, sizeof(hex), "\\x%02x", static_cast<unsigned>(c)), ascii += hex;
    else if (c < 0x10000) std::snprintf(hex, sizeof(hex), "\\u%04x", static_cast<unsigned>(c)), ascii += hex;
    else std::snprintf(hex, sizeof(hex), "\\U%08x", static_cast<unsigned>(c)), ascii += hex;
  }
  std::string out;
  auto read_hex = [&](size_t& i, int n) {
    char32_t v = 0;
    for (int k = 0; k < n; ++k, ++i) {
      if (i >= ascii.size() || !std::isxdigit(static_cast<unsigned char>(ascii[i])))
        syntax_error(line, "truncated \\x, \\u or \\U escape in string literal");
      char c = ascii[i];
      v = v * 16 + static_cast<char32_t>(is_digit(c) ? c - '0' : (std::tolower(c) - 'a' + 10));
    }
    return v;
  };
  for (size_t i = 0; i < ascii.size();) {
    char c = ascii[i];
    if (c != '\\') {
      out += c;
      ++i;
      continue;
    }
    if (i + 1 >= ascii.size()) syntax_error(line, "\\ at end of string literal");
    char e = ascii[i + 1];
    i += 2;
    switch (e) {
      case '\n': break;  // line continuation
      case '\\': out += '\\'; break;
      case '\'': out += '\''; break;
      case '"': out += '"'; break;
      case 'a': out += '\a'; break;
      case 'b': out += '\b'; break;
      case 'f': out += '\f'; break;
      case 'n': out += '\n'; break;
      case 'r': out += '\r'; break;
      case 't': out += '\t'; break;
      case 'v': out += '\v'; break;
      case 'x': append_utf8(out, read_hex(i, 2)); break;
      case 'u': append_utf8(out, read_hex(i, 4)); break;
      case 'U': {
        char32_t cp = read_hex(i, 8);
        if (cp > 0x10FFFF) syntax_error(line, "illegal Unicode character in string literal");
        append_utf8(out, cp);
        break;
      }
      case 'N': syntax_error(line, "\\N{...} escapes are not supported");
      default:
        if (e >= '0' && e <= '7') {  // up to three octal digits
          char32_t v = static_cast<char32_t>(e - '0');
          for (int k = 0; k < 2 && i < ascii.size() && ascii[i] >= '0' && ascii[i] <= '7'; ++k, ++i)
            v = v * 8 + static_cast<char32_t>(ascii[i] - '0');
          append_utf8(out, v);
        } else {  // unknown escapes stay as written
          out += '\\';
          out += e;
        }
    }
  }
  return out;
}

class Lexer {
 public:
  explicit Lexer(const std::string& source) {
    // jinja2 normalises newlines and drops one trailing newline (keep_trailing_newline=False).
    src_.reserve(source.size());
    for (size_t i = 0; i < source.size(); ++i) {
      if (source[i] == '\r') {
        src_ += '\n';
        if (i + 1 < source.size() && source[i + 1] == '\n') ++i;
      } else {
        src_ += source[i];
      }
    }
    if (!src_.empty() && src_.back() == '\n') src_.pop_back();
  }

  std::vector<Token> run() {
    bool line_starting = true;  // the text before the next tag begins a line (lstrip_blocks)
    while (pos_ < src_.size()) {
      size_t tag = find_tag_start(pos_);
      if (tag == std::string::npos) {
        emit_text(src_.substr(pos_));
        pos_ = src_.size();
        break;
      }
      std::string text = src_.substr(pos_, tag - pos_);
      char kind = src_[tag + 1];  // '{', '%' or '#'
      size_t after = tag + 2;
      char sign = after < src_.size() && (src_[after] == '-' || src_[after] == '+') ? src_[after] : 0;
      if (sign == '-') {
        // '-' strips all whitespace before the tag (Python's rstrip()).
        std::u32string u = to_u32(text);
        while (!u.empty() && py_isspace(u.back())) u.pop_back();
        text = to_utf8(u);
      } else if (sign != '+' && kind != '{') {
        // lstrip_blocks: spaces and tabs between a line start and a block or comment tag go.
        size_t l_pos = text.rfind('\n');
        l_pos = l_pos == std::string::npos ? 0 : l_pos + 1;
        std::u32string tail = to_u32(std::string_view(text).substr(l_pos));
        if ((l_pos > 0 || line_starting) && !tail.empty() && std::all_of(tail.begin(), tail.end(), py_isspace))
          text.resize(l_pos);
      }
      emit_text(text);
      advance_to(after + (sign ? 1 : 0));
      if (kind == '%' && lex_raw(line_starting)) continue;
      if (kind == '#') {
        line_starting = lex_comment();
      } else {
        int line = line_;
        tokens_.push_back({kind == '{' ? Tok::VarBegin : Tok::BlockBegin, "", line});
        line_starting = lex_tag(kind == '{');
      }
    }
    tokens_.push_back({Tok::Eof, "", line_});
    return std::move(tokens_);
  }

 private:
  size_t find_tag_start(size_t from) const {
    for (size_t i = src_.find('{', from); i != std::string::npos; i = src_.find('{', i + 1)) {
      if (i + 1 < src_.size() && (src_[i + 1] == '{' || src_[i + 1] == '%' || src_[i + 1] == '#')) return i;
    }
    return std::string::npos;
  }

  void advance_to(size_t p) {
    for (size_t i = pos_; i < p && i < src_.size(); ++i)
      if (src_[i] == '\n') ++line_;
    pos_ = p;
  }

  void emit_text(const std::string& text) {
    int line = line_;
    if (!text.empty()) tokens_.push_back({Tok::Text, text, line});
  }

  // After an end marker: '-' strips all following whitespace, '+' keeps it, and otherwise
  // trim_blocks removes one newline (block and comment tags only). Returns whether the consumed
  // end ends with a newline (the next text then starts a line).
  bool after_end(char sign, bool trim_newline) {
    size_t p = pos_;
    if (sign == '-') {
      while (size_t n = space_len(src_, p)) p += n;
    } else if (sign != '+' && trim_newline && p < src_.size() && src_[p] == '\n') {
      ++p;
    }
    bool ends_newline = p > 0 && src_[p - 1] == '\n';
    advance_to(p);
    return ends_newline;
  }

  // {% raw %}...{% endraw %}: the text in between is data. jinja2 trims no newline after the
  // opening tag; the closing tag follows the usual '-', '+', lstrip and trim rules.
  bool lex_raw(bool& line_starting) {
    size_t p = pos_;
    while (size_t n = space_len(src_, p)) p += n;
    if (src_.compare(p, 3, "raw") != 0 || (p + 3 < src_.size() && is_name_char(src_[p + 3]))) return false;
    p += 3;
    while (size_t n = space_len(src_, p)) p += n;
    bool strip_after = src_.compare(p, 3, "-%}") == 0;
    if (!strip_after && src_.compare(p, 2, "%}") != 0) return false;
    p += strip_after ? 3 : 2;
    if (strip_after)
      while (size_t n = space_len(src_, p)) p += n;
    int start_line = line_;
    advance_to(p);
    for (size_t tag = find_tag_start(pos_); tag != std::string::npos; tag = find_tag_start(tag + 1)) {
      if (src_[tag + 1] != '%') continue;
      size_t q = tag + 2;
      char sign = q < src_.size() && (src_[q] == '-' || src_[q] == '+') ? src_[q++] : 0;
      while (size_t n = space_len(src_, q)) q += n;
      if (src_.compare(q, 6, "endraw") != 0) continue;
      q += 6;
      while (size_t n = space_len(src_, q)) q += n;
      char end_sign = q < src_.size() && (src_[q] == '-' || src_[q] == '+') ? src_[q++] : 0;
      if (src_.compare(q, 2, "%}") != 0) continue;
      std::string text = src_.substr(pos_, tag - pos_);
      if (sign == '-') {
        std::u32string u = to_u32(text);
        while (!u.empty() && py_isspace(u.back())) u.pop_back();
        text = to_utf8(u);
      } else if (sign != '+') {
        size_t l_pos = text.rfind('\n');
        l_pos = l_pos == std::string::npos ? 0 : l_pos + 1;
        std::u32string tail = to_u32(std::string_view(text).substr(l_pos));
        if ((l_pos > 0 || strip_after) && !tail.empty() && std::all_of(tail.begin(), tail.end(), py_isspace))
          text.resize(l_pos);
      }
      emit_text(text);
      advance_to(q + 2);
      line_starting = after_end(end_sign, true);
      return true;
    }
    syntax_error(start_line, "missing '{% endraw %}'");
  }

  bool lex_comment() {
    int start_line = line_;
    for (size_t i = pos_; i + 1 < src_.size(); ++i) {
      char sign = 0;
      size_t end_at = i;
      if ((src_[i] == '-' || src_[i] == '+') && i + 2 < src_.size() && src_[i + 1] == '#' && src_[i + 2] == '}') {
        sign = src_[i];
        end_at = i + 3;
      } else if (src_[i] == '#' && src_[i + 1] == '}') {
        end_at = i + 2;
      } else {
        continue;
      }
      advance_to(end_at);
      return after_end(sign, true);
    }
    syntax_error(start_line, "missing end of comment tag");
  }

  // Tokens of one {{ ... }} or {% ... %} up to its end marker (only at bracket depth 0).
  bool lex_tag(bool variable) {
    int start_line = line_;
    std::vector<char> brackets;
    while (true) {
      while (size_t n = space_len(src_, pos_)) advance_to(pos_ + n);
      if (pos_ >= src_.size()) syntax_error(start_line, std::string("unexpected end of template, missing '") +
                                                            (variable ? "}}" : "%}") + "'");
      if (brackets.empty()) {
        const char* close = variable ? "}}" : "%}";
        char sign = 0;
        size_t end_at = 0;
        if (src_.compare(pos_, 2, close) == 0) {
          end_at = pos_ + 2;
        } else if ((src_[pos_] == '-' || (!variable && src_[pos_] == '+')) && src_.compare(pos_ + 1, 2, close) == 0) {
          sign = src_[pos_];
          end_at = pos_ + 3;
        }
        if (end_at) {
          tokens_.push_back({variable ? Tok::VarEnd : Tok::BlockEnd, "", line_});
          advance_to(end_at);
          return after_end(sign, !variable);
        }
      }
      lex_token(brackets);
    }
  }

  void lex_token(std::vector<char>& brackets) {
    int line = line_;
    char c = src_[pos_];
    if (is_name_start(c)) {
      size_t e = pos_;
      while (e < src_.size() && is_name_char(src_[e])) ++e;
      tokens_.push_back({Tok::Name, src_.substr(pos_, e - pos_), line});
      advance_to(e);
      return;
    }
    if (c == '\'' || c == '"') {
      size_t e = pos_ + 1;
      while (e < src_.size() && src_[e] != c) e += src_[e] == '\\' ? 2 : 1;
      if (e >= src_.size()) syntax_error(line, "unterminated string literal");
      tokens_.push_back({Tok::String, decode_string_literal(std::string_view(src_).substr(pos_ + 1, e - pos_ - 1), line), line});
      advance_to(e + 1);
      return;
    }
    if (is_digit(c)) {
      lex_number(line);
      return;
    }
    static const char* kOps[] = {"//", "**", "==", "!=", "<=", ">=", "+", "-", "/", "*", "%", "~", "[", "]", "(",
                                 ")",  "{",  "}",  "<",  ">",  "=",  ".", ":", "|", ",", ";"};
    for (const char* op : kOps) {
      size_t n = std::strlen(op);
      if (src_.compare(pos_, n, op) != 0) continue;
      if (n == 1 && (c == '(' || c == '[' || c == '{')) {
        brackets.push_back(c);
      } else if (n == 1 && (c == ')' || c == ']' || c == '}')) {
        char open = c == ')' ? '(' : c == ']' ? '[' : '{';
        if (brackets.empty() || brackets.back() != open) syntax_error(line, std::string("unexpected '") + c + "'");
        brackets.pop_back();
      }
      tokens_.push_back({Tok::Op, op, line});
      advance_to(pos_ + n);
      return;
    }
    syntax_error(line, "unexpected character '" + one_line(std::string(1, c)) + "'");
  }

  // Integers (with '_' separators) and floats ("1.5", "1e5", "2.5E-3"); "1." is 1 then '.'.
  void lex_number(int line) {
    size_t p = pos_;
    if (src_[p] == '0' && p + 1 < src_.size() && std::strchr("xXoObB", src_[p + 1])) {  // 0x.. 0o.. 0b..
      char base_char = static_cast<char>(std::tolower(src_[p + 1]));
      int base = base_char == 'x' ? 16 : base_char == 'o' ? 8 : 2;
      size_t e = p + 2;
      std::string digits;
      while (e < src_.size() && (std::isxdigit(static_cast<unsigned char>(src_[e])) || src_[e] == '_')) {
        if (src_[e] != '_') digits += src_[e];
        ++e;
      }
      Token t{Tok::Int, src_.substr(p, e - p), line};
      auto [ptr, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), t.int_value, base);
      if (digits.empty() || ec != std::errc() || ptr != digits.data() + digits.size())
        syntax_error(line, "invalid integer literal " + one_line(t.text));
      tokens_.push_back(t);
      advance_to(e);
      return;
    }
    auto digits = [&]() {
      size_t s = p;
      while (p < src_.size() && (is_digit(src_[p]) || (src_[p] == '_' && p + 1 < src_.size() && is_digit(src_[p + 1]))))
        ++p;
      return p > s;
    };
    digits();
    bool is_float = false;
    if (p + 1 < src_.size() && src_[p] == '.' && is_digit(src_[p + 1])) {
      ++p;
      digits();
      is_float = true;
    }
    if (p < src_.size() && (src_[p] == 'e' || src_[p] == 'E')) {
      size_t save = p++;
      if (p < src_.size() && (src_[p] == '+' || src_[p] == '-')) ++p;
      if (p < src_.size() && is_digit(src_[p])) {
        digits();
        is_float = true;
      } else {
        p = save;
      }
    }
    std::string spelled;
    for (size_t i = pos_; i < p; ++i)
      if (src_[i] != '_') spelled += src_[i];
    if (!is_float && spelled.size() > 1 && spelled[0] == '0' && spelled.find_first_not_of('0') != std::string::npos)
      syntax_error(line, "leading zeros in integer literal " + spelled);  // as in Python
    Token t{is_float ? Tok::Float : Tok::Int, spelled, line};
    if (is_float) {
      t.float_value = std::strtod(spelled.c_str(), nullptr);
    } else {
      auto [ptr, ec] = std::from_chars(spelled.data(), spelled.data() + spelled.size(), t.int_value);
      if (ec != std::errc()) syntax_error(line, "integer literal too large: " + spelled);
      (void)ptr;
    }
    tokens_.push_back(t);
    advance_to(p);
  }

  std::string src_;
  size_t pos_ = 0;
  int line_ = 1;
  std::vector<Token> tokens_;
};

}  // namespace

// ---------------------------------------------------------------------------------------------------
// 4. AST and parser
// ---------------------------------------------------------------------------------------------------

namespace {

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;
struct FilterDef;
struct TestDef;

struct Expr {
  enum class K { Const, Name, List, Tuple, Dict, GetAttr, GetItem, Slice, Call, Filter, Test, Not, Neg, Pos,
                 Binary, And, Or, Compare, Cond };
  K k;
  int line = 0;
  Json value;                      // Const
  std::string name;                // Name, GetAttr attribute, Filter/Test name, Binary operator
  std::vector<ExprPtr> args;       // operands; Dict: key, value, key, value...; Slice: obj, start, stop, step
  std::vector<std::pair<std::string, ExprPtr>> kwargs;  // Call / Filter / Test keyword arguments
  std::vector<std::string> ops;    // Compare: one operator per operand after the first
  const FilterDef* filter = nullptr;
  const TestDef* test = nullptr;
};

struct Stmt;
using StmtPtr = std::unique_ptr<Stmt>;
using Body = std::vector<StmtPtr>;

struct MacroParam {
  std::string name;
  ExprPtr default_value;  // null: required (missing ones are undefined, as in jinja2)
};

struct Stmt {
  enum class K { Text, Output, If, For, Set, SetAttr, SetBlock, Macro, Break, Continue, FilterBlock, Scope };
  K k;
  int line = 0;
  std::string text;                   // Text; Macro name; SetAttr namespace name
  std::string attr;                   // SetAttr attribute
  std::vector<std::string> targets;   // For / Set / SetBlock names (several: tuple unpacking)
  ExprPtr expr;                       // Output; Set value; For iterable
  ExprPtr cond;                       // For: the `if` filter
  std::vector<std::pair<ExprPtr, Body>> branches;  // If / elif
  Body body, else_body;
  std::vector<MacroParam> params;
  std::vector<ExprPtr> filters;       // FilterBlock / SetBlock: Filter nodes applied to the body
};

using FilterFn = Value (*)(Renderer&, Value&, CallArgs&);
using TestFn = bool (*)(Renderer&, const Value&, CallArgs&);
struct FilterDef {
  FilterFn fn;
};
struct TestDef {
  TestFn fn;
};
const FilterDef* find_filter(const std::string& name);
const TestDef* find_test(const std::string& name);

class Parser {
 public:
  explicit Parser(std::vector<Token> tokens) : toks_(std::move(tokens)) {}

  Body parse_template() {
    Body body = parse_body({});
    if (cur().type != Tok::Eof) syntax_error(cur().line, "unexpected tag");
    return body;
  }

 private:
  const Token& cur() const { return toks_[i_]; }
  const Token& peek(size_t n = 1) const { return toks_[std::min(i_ + n, toks_.size() - 1)]; }
  const Token& next() {
    const Token& t = toks_[i_];
    if (i_ + 1 < toks_.size()) ++i_;
    return t;
  }
  bool is_op(const char* op) const { return cur().type == Tok::Op && cur().text == op; }
  bool is_name(const char* name) const { return cur().type == Tok::Name && cur().text == name; }
  bool skip_op(const char* op) {
    if (!is_op(op)) return false;
    next();
    return true;
  }
  bool skip_name(const char* name) {
    if (!is_name(name)) return false;
    next();
    return true;
  }
  static std::string describe(const Token& t) {
    switch (t.type) {
      case Tok::Eof: return "end of template";
      case Tok::VarEnd: return "end of print statement '}}'";
      case Tok::BlockEnd: return "end of statement block '%}'";
      case Tok::Text: return "template text";
      case Tok::VarBegin: return "'{{'";
      case Tok::BlockBegin: return "'{%'";
      case Tok::String: return "string literal";
      default: return "'" + one_line(t.text) + "'";
    }
  }
  void expect_op(const char* op) {
    if (!skip_op(op)) syntax_error(cur().line, std::string("expected '") + op + "', got " + describe(cur()));
  }
  std::string expect_name() {
    if (cur().type != Tok::Name) syntax_error(cur().line, "expected a name, got " + describe(cur()));
    return next().text;
  }
  void expect_block_end() {
    if (cur().type != Tok::BlockEnd) syntax_error(cur().line, "expected end of statement block, got " + describe(cur()));
    next();
  }

  static ExprPtr node(Expr::K k, int line) {
    auto e = std::make_unique<Expr>();
    e->k = k;
    e->line = line;
    return e;
  }

  // Statements up to a {% name %} whose name is in `ends` (left unconsumed after the '{%').
  Body parse_body(const std::vector<std::string>& ends) {
    Body body;
    while (true) {
      const Token& t = cur();
      if (t.type == Tok::Eof) {
        if (!ends.empty()) syntax_error(t.line, "unexpected end of template, expected '" + ends.front() + "'");
        return body;
      }
      if (t.type == Tok::Text) {
        auto s = std::make_unique<Stmt>();
        s->k = Stmt::K::Text;
        s->line = t.line;
        s->text = t.text;
        body.push_back(std::move(s));
        next();
      } else if (t.type == Tok::VarBegin) {
        auto s = std::make_unique<Stmt>();
        s->k = Stmt::K::Output;
        s->line = t.line;
        next();
        s->expr = parse_tuple(true, false);
        if (cur().type != Tok::VarEnd) syntax_error(cur().line, "expected '}}', got " + describe(cur()));
        next();
        body.push_back(std::move(s));
      } else if (t.type == Tok::BlockBegin) {
        const Token& name = peek();
        if (name.type != Tok::Name) syntax_error(name.line, "expected a tag name, got " + describe(name));
        if (std::find(ends.begin(), ends.end(), name.text) != ends.end()) {
          next();  // leave the name for the caller
          return body;
        }
        next();
        body.push_back(parse_statement());
      } else {
        syntax_error(t.line, "unexpected " + describe(t));
      }
    }
  }

  // Bounds recursion so absurdly nested input is an error, not a stack overflow.
  struct Nest {
    Nest(Parser& p, int line) : parser(p) {
      if (++parser.depth_ > kMaxNesting) syntax_error(line, "nesting too deep");
    }
    ~Nest() { --parser.depth_; }
    Parser& parser;
  };
  static constexpr int kMaxNesting = 600;  // ~200 levels of parentheses

  StmtPtr parse_statement() {
    Nest nest(*this, cur().line);
    const Token& t = cur();
    int line = t.line;
    std::string tag = t.text;
    auto s = std::make_unique<Stmt>();
    s->line = line;
    next();
    if (tag == "if") {
      s->k = Stmt::K::If;
      while (true) {
        ExprPtr c = parse_tuple(false, false);
        expect_block_end();
        Body b = parse_body({"elif", "else", "endif"});
        s->branches.emplace_back(std::move(c), std::move(b));
        std::string which = next().text;
        if (which == "elif") continue;
        if (which == "else") {
          expect_block_end();
          s->else_body = parse_body({"endif"});
          next();
        }
        break;
      }
      expect_block_end();
    } else if (tag == "for") {
      s->k = Stmt::K::For;
      s->targets = parse_assign_names();
      if (!skip_name("in")) syntax_error(cur().line, "expected 'in' in for loop, got " + describe(cur()));
      s->expr = parse_tuple(false, false, {"recursive"});
      if (skip_name("if")) s->cond = parse_expression(true);
      if (is_name("recursive")) syntax_error(cur().line, "recursive loops are not supported");
      expect_block_end();
      s->body = parse_body({"endfor", "else"});
      if (next().text == "else") {
        expect_block_end();
        s->else_body = parse_body({"endfor"});
        next();
      }
      expect_block_end();
    } else if (tag == "set") {
      if (cur().type == Tok::Name && peek().type == Tok::Op && peek().text == ".") {
        s->k = Stmt::K::SetAttr;
        s->text = next().text;
        next();
        s->attr = expect_name();
        expect_op("=");
        s->expr = parse_tuple(true, false);
        expect_block_end();
      } else {
        s->targets = parse_assign_names();
        if (skip_op("=")) {
          s->k = Stmt::K::Set;
          s->expr = parse_tuple(true, false);
          expect_block_end();
        } else {
          // {% set x | filter %}...{% endset %}
          s->k = Stmt::K::SetBlock;
          if (s->targets.size() != 1) syntax_error(line, "a block set takes one name");
          while (skip_op("|")) s->filters.push_back(parse_filter(nullptr));
          expect_block_end();
          s->body = parse_body({"endset"});
          next();
          expect_block_end();
        }
      }
    } else if (tag == "macro") {
      s->k = Stmt::K::Macro;
      s->text = expect_name();
      expect_op("(");
      while (!is_op(")")) {
        if (!s->params.empty()) expect_op(",");
        if (is_op(")")) break;
        MacroParam p;
        p.name = expect_name();
        if (skip_op("=")) p.default_value = parse_expression(true);
        s->params.push_back(std::move(p));
      }
      expect_op(")");
      expect_block_end();
      s->body = parse_body({"endmacro"});
      next();
      if (cur().type == Tok::Name && cur().text == s->text) next();  // {% endmacro name %}
      expect_block_end();
    } else if (tag == "break" || tag == "continue") {
      s->k = tag == "break" ? Stmt::K::Break : Stmt::K::Continue;
      expect_block_end();
    } else if (tag == "filter") {
      s->k = Stmt::K::FilterBlock;
      s->filters.push_back(parse_filter(nullptr));
      while (skip_op("|")) s->filters.push_back(parse_filter(nullptr));
      expect_block_end();
      s->body = parse_body({"endfilter"});
      next();
      expect_block_end();
    } else if (tag == "generation") {
      // transformers' {% generation %} marks assistant text for masks; the text renders unchanged.
      s->k = Stmt::K::Scope;
      expect_block_end();
      s->body = parse_body({"endgeneration"});
      next();
      expect_block_end();
    } else {
      syntax_error(line, "unknown or unsupported tag '" + one_line(tag) + "'");
    }
    return s;
  }

  // Assignment targets: `x`, `a, b` or `(a, b)`.
  std::vector<std::string> parse_assign_names() {
    std::vector<std::string> names;
    bool paren = skip_op("(");
    while (true) {
      std::string n = expect_name();
      if (n == "true" || n == "false" || n == "none" || n == "True" || n == "False" || n == "None")
        syntax_error(cur().line, "cannot assign to '" + n + "'");
      names.push_back(n);
      if (!skip_op(",")) break;
      if (cur().type != Tok::Name) break;  // trailing comma
    }
    if (paren) expect_op(")");
    return names;
  }

  // jinja2's parse_tuple: `a, b` makes a tuple; `with_condexpr` allows `x if c else y` at the top.
  ExprPtr parse_tuple(bool with_condexpr, bool explicit_parens, const std::vector<std::string>& extra_ends = {}) {
    int line = cur().line;
    std::vector<ExprPtr> items;
    bool is_tuple = false;
    while (true) {
      if (!items.empty()) expect_op(",");
      const Token& t = cur();
      bool at_end = t.type == Tok::VarEnd || t.type == Tok::BlockEnd || (t.type == Tok::Op && t.text == ")") ||
                    (t.type == Tok::Name && std::find(extra_ends.begin(), extra_ends.end(), t.text) != extra_ends.end());
      if (at_end) break;
      items.push_back(parse_expression(with_condexpr));
      if (is_op(",")) is_tuple = true;
      else break;
    }
    if (!is_tuple) {
      if (!items.empty()) return std::move(items[0]);
      if (!explicit_parens) syntax_error(cur().line, "expected an expression, got " + describe(cur()));
    }
    auto e = node(Expr::K::Tuple, line);
    e->args = std::move(items);
    return e;
  }

  ExprPtr parse_expression(bool with_condexpr) {
    Nest nest(*this, cur().line);
    return with_condexpr ? parse_condexpr() : parse_or();
  }

  ExprPtr parse_condexpr() {
    ExprPtr expr = parse_or();
    while (is_name("if")) {
      int line = next().line;
      auto e = node(Expr::K::Cond, line);
      ExprPtr c = parse_or();
      ExprPtr otherwise = skip_name("else") ? parse_condexpr() : nullptr;
      e->args.push_back(std::move(c));
      e->args.push_back(std::move(expr));
      e->args.push_back(std::move(otherwise));
      expr = std::move(e);
    }
    return expr;
  }

  ExprPtr parse_or() {
    ExprPtr left = parse_and();
    while (is_name("or")) {
      auto e = node(Expr::K::Or, next().line);
      e->args.push_back(std::move(left));
      e->args.push_back(parse_and());
      left = std::move(e);
    }
    return left;
  }

  ExprPtr parse_and() {
    ExprPtr left = parse_not();
    while (is_name("and")) {
      auto e = node(Expr::K::And, next().line);
      e->args.push_back(std::move(left));
      e->args.push_back(parse_not());
      left = std::move(e);
    }
    return left;
  }

  ExprPtr parse_not() {
    Nest nest(*this, cur().line);
    if (is_name("not")) {
      auto e = node(Expr::K::Not, next().line);
      e->args.push_back(parse_not());
      return e;
    }
    return parse_compare();
  }

  ExprPtr parse_compare() {
    int line = cur().line;
    ExprPtr first = parse_math1();
    ExprPtr cmp;
    while (true) {
      std::string op;
      if (cur().type == Tok::Op && (cur().text == "==" || cur().text == "!=" || cur().text == "<" ||
                                    cur().text == "<=" || cur().text == ">" || cur().text == ">=")) {
        op = next().text;
      } else if (is_name("in")) {
        next();
        op = "in";
      } else if (is_name("not") && peek().type == Tok::Name && peek().text == "in") {
        next();
        next();
        op = "not in";
      } else {
        break;
      }
      if (!cmp) {
        cmp = node(Expr::K::Compare, line);
        cmp->args.push_back(std::move(first));
      }
      cmp->ops.push_back(op);
      cmp->args.push_back(parse_math1());
    }
    return cmp ? std::move(cmp) : std::move(first);
  }

  ExprPtr binary(const std::string& op, ExprPtr l, ExprPtr r, int line) {
    auto e = node(Expr::K::Binary, line);
    e->name = op;
    e->args.push_back(std::move(l));
    e->args.push_back(std::move(r));
    return e;
  }

  ExprPtr parse_math1() {  // + -
    ExprPtr left = parse_concat();
    while (is_op("+") || is_op("-")) {
      const Token& t = next();
      std::string op = t.text;
      left = binary(op, std::move(left), parse_concat(), t.line);
    }
    return left;
  }

  ExprPtr parse_concat() {  // ~
    ExprPtr left = parse_math2();
    while (is_op("~")) {
      int line = next().line;
      left = binary("~", std::move(left), parse_math2(), line);
    }
    return left;
  }

  ExprPtr parse_math2() {  // * / // %
    ExprPtr left = parse_pow();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      const Token& t = next();
      std::string op = t.text;
      left = binary(op, std::move(left), parse_pow(), t.line);
    }
    return left;
  }

  ExprPtr parse_pow() {  // ** (left-associative in jinja2)
    ExprPtr left = parse_unary(true);
    while (is_op("**")) {
      int line = next().line;
      left = binary("**", std::move(left), parse_unary(true), line);
    }
    return left;
  }

  // Unary minus binds looser than postfix but the filter applies to the negation: -x|abs is (-x)|abs.
  ExprPtr parse_unary(bool with_filter) {
    Nest nest(*this, cur().line);
    ExprPtr e;
    if (is_op("-") || is_op("+")) {
      const Token& t = next();
      e = node(t.text == "-" ? Expr::K::Neg : Expr::K::Pos, t.line);
      e->args.push_back(parse_unary(false));
    } else {
      e = parse_primary();
    }
    e = parse_postfix(std::move(e));
    if (with_filter) e = parse_filter_expr(std::move(e));
    return e;
  }

  ExprPtr parse_primary() {
    const Token& t = cur();
    int line = t.line;
    if (t.type == Tok::Name) {
      next();
      if (t.text == "true" || t.text == "True" || t.text == "false" || t.text == "False") {
        auto e = node(Expr::K::Const, line);
        e->value = t.text == "true" || t.text == "True";
        return e;
      }
      if (t.text == "none" || t.text == "None") {
        auto e = node(Expr::K::Const, line);
        e->value = nullptr;
        return e;
      }
      auto e = node(Expr::K::Name, line);
      e->name = t.text;
      return e;
    }
    if (t.type == Tok::String) {
      std::string s;
      while (cur().type == Tok::String) s += next().text;  // adjacent literals concatenate
      auto e = node(Expr::K::Const, line);
      e->value = s;
      return e;
    }
    if (t.type == Tok::Int || t.type == Tok::Float) {
      next();
      auto e = node(Expr::K::Const, line);
      if (t.type == Tok::Int) e->value = t.int_value;
      else e->value = t.float_value;
      return e;
    }
    if (is_op("(")) {
      next();
      ExprPtr e = parse_tuple(true, true);
      expect_op(")");
      return e;
    }
    if (is_op("[")) {
      next();
      auto e = node(Expr::K::List, line);
      while (!is_op("]")) {
        if (!e->args.empty()) expect_op(",");
        if (is_op("]")) break;
        e->args.push_back(parse_expression(true));
      }
      expect_op("]");
      return e;
    }
    if (is_op("{")) {
      next();
      auto e = node(Expr::K::Dict, line);
      while (!is_op("}")) {
        if (!e->args.empty()) expect_op(",");
        if (is_op("}")) break;
        e->args.push_back(parse_expression(true));
        expect_op(":");
        e->args.push_back(parse_expression(true));
      }
      expect_op("}");
      return e;
    }
    syntax_error(line, "unexpected " + describe(t));
  }

  ExprPtr parse_postfix(ExprPtr e) {
    while (true) {
      if (is_op(".")) {
        int line = next().line;
        const Token& a = cur();
        if (a.type == Tok::Name) {
          auto g = node(Expr::K::GetAttr, line);
          g->name = next().text;
          g->args.push_back(std::move(e));
          e = std::move(g);
        } else if (a.type == Tok::Int) {  // x.0 is x[0]
          auto g = node(Expr::K::GetItem, line);
          auto idx = node(Expr::K::Const, line);
          idx->value = next().int_value;
          g->args.push_back(std::move(e));
          g->args.push_back(std::move(idx));
          e = std::move(g);
        } else {
          syntax_error(a.line, "expected a name or number after '.', got " + describe(a));
        }
      } else if (is_op("[")) {
        e = parse_subscript(std::move(e));
      } else if (is_op("(")) {
        e = parse_call(std::move(e));
      } else {
        return e;
      }
    }
  }

  ExprPtr parse_subscript(ExprPtr obj) {
    int line = next().line;  // '['
    std::vector<ExprPtr> items;
    while (!is_op("]")) {
      if (!items.empty()) expect_op(",");
      items.push_back(parse_subscribed());
    }
    expect_op("]");
    if (items.empty()) syntax_error(line, "expected a subscript");
    ExprPtr index;
    if (items.size() == 1) {
      index = std::move(items[0]);
    } else {
      index = node(Expr::K::Tuple, line);
      index->args = std::move(items);
    }
    if (index->k == Expr::K::Slice) {  // Slice node carries the object as its first operand
      index->args[0] = std::move(obj);
      return index;
    }
    auto g = node(Expr::K::GetItem, line);
    g->args.push_back(std::move(obj));
    g->args.push_back(std::move(index));
    return g;
  }

  // One subscript: an expression or a slice start:stop:step (each part optional).
  ExprPtr parse_subscribed() {
    int line = cur().line;
    ExprPtr start;
    if (!is_op(":")) {
      start = parse_expression(true);
      if (!is_op(":")) return start;
    }
    next();  // ':'
    auto s = node(Expr::K::Slice, line);
    s->args.push_back(nullptr);  // the object, filled in by parse_subscript
    s->args.push_back(std::move(start));
    s->args.push_back(is_op("]") || is_op(",") || is_op(":") ? nullptr : parse_expression(true));
    if (skip_op(":")) s->args.push_back(is_op("]") || is_op(",") ? nullptr : parse_expression(true));
    else s->args.push_back(nullptr);
    return s;
  }

  // ( positional..., name=value... )
  void parse_call_args(Expr& e) {
    expect_op("(");
    bool first = true;
    while (!is_op(")")) {
      if (!first) expect_op(",");
      first = false;
      if (is_op(")")) break;
      if (is_op("*") || is_op("**")) syntax_error(cur().line, "*args and **kwargs in calls are not supported");
      if (cur().type == Tok::Name && peek().type == Tok::Op && peek().text == "=") {
        std::string key = next().text;
        next();
        e.kwargs.emplace_back(key, parse_expression(true));
      } else {
        if (!e.kwargs.empty()) syntax_error(cur().line, "positional argument after keyword argument");
        e.args.push_back(parse_expression(true));
      }
    }
    expect_op(")");
  }

  ExprPtr parse_call(ExprPtr callee) {
    auto e = node(Expr::K::Call, cur().line);
    e->args.push_back(std::move(callee));
    parse_call_args(*e);
    return e;
  }

  ExprPtr parse_filter_expr(ExprPtr e) {
    while (true) {
      if (is_op("|")) {
        next();
        e = parse_filter(std::move(e));
      } else if (is_name("is")) {
        e = parse_test(std::move(e));
      } else if (is_op("(")) {
        e = parse_call(std::move(e));
      } else {
        return e;
      }
    }
  }

  // `name` or `name(args)` after '|' (already consumed); `subject` is null in {% filter %} and
  // {% set x | f %}, where the rendered body is the subject.
  ExprPtr parse_filter(ExprPtr subject) {
    int line = cur().line;
    std::string name = expect_name();
    while (is_op(".")) {
      next();
      name += "." + expect_name();
    }
    auto e = node(Expr::K::Filter, line);
    e->name = name;
    e->filter = find_filter(name);
    if (!e->filter) syntax_error(line, "no filter named '" + one_line(name) + "'");
    e->args.push_back(std::move(subject));
    if (is_op("(")) parse_call_args(*e);
    return e;
  }

  ExprPtr parse_test(ExprPtr subject) {
    int line = next().line;  // 'is'
    bool negated = skip_name("not");
    std::string name = expect_name();
    while (is_op(".")) {
      next();
      name += "." + expect_name();
    }
    auto e = node(Expr::K::Test, line);
    e->name = name;
    e->test = find_test(name);
    if (!e->test) syntax_error(line, "no test named '" + one_line(name) + "'");
    e->args.push_back(std::move(subject));
    if (is_op("(")) {
      parse_call_args(*e);
    } else {
      // One argument without parentheses: `is divisibleby 3`, `is sameas none`.
      const Token& t = cur();
      bool starts_operand = t.type == Tok::String || t.type == Tok::Int || t.type == Tok::Float ||
                            (t.type == Tok::Op && (t.text == "(" || t.text == "[" || t.text == "{")) ||
                            (t.type == Tok::Name && t.text != "else" && t.text != "or" && t.text != "and");
      if (t.type == Tok::Name && t.text == "is") syntax_error(t.line, "you cannot chain multiple tests with 'is'");
      if (starts_operand) e->args.push_back(parse_postfix(parse_primary()));
    }
    if (!negated) return e;
    auto n = node(Expr::K::Not, line);
    n->args.push_back(std::move(e));
    return n;
  }

  std::vector<Token> toks_;
  size_t i_ = 0;
  int depth_ = 0;
};

}  // namespace

// ---------------------------------------------------------------------------------------------------
// 5. Evaluation
// ---------------------------------------------------------------------------------------------------

namespace {

// Variables. A for-loop iteration and a macro call get a fresh scope whose parent is where they run
// (macros: where they were defined), so `set` inside a loop body does not leak out, as in jinja2.
struct Scope {
  std::unordered_map<std::string, Value> vars;
  Scope* parent = nullptr;
};

enum class Flow { Normal, Break, Continue };

class Renderer {
 public:
  explicit Renderer(std::optional<std::tm> fixed_time) : fixed_time_(fixed_time) {}

  std::string run(const Body& body, const Json& context);

  Value eval(const Expr& e, Scope* scope);
  Flow exec(const Body& body, Scope* scope, std::string& out);
  Value call(const Value& callee, CallArgs& args);
  Value apply_filter(const Expr& filter, Value subject, Scope* scope);
  Scope* new_scope(Scope* parent) {
    scopes_.push_back(std::make_unique<Scope>());
    scopes_.back()->parent = parent;
    return scopes_.back().get();
  }
  std::string strftime_now(const std::string& format) const;

  int depth = 0;

 private:
  Flow exec_one(const Stmt& s, Scope* scope, std::string& out);
  CallArgs eval_args(const Expr& e, size_t first, Scope* scope);
  void assign(Scope* scope, const std::vector<std::string>& names, const Value& v);

  std::optional<std::tm> fixed_time_;
  std::vector<std::unique_ptr<Scope>> scopes_;  // all scopes live until the render ends
};

Value make_callable(std::string name, std::function<Value(Renderer&, CallArgs&)> fn) {
  Value v;
  v.kind = Value::Kind::Callable;
  v.callable = std::make_shared<Callable>(Callable{std::move(name), std::move(fn)});
  return v;
}

const Value* get_arg(const CallArgs& a, size_t index, const char* name) {
  if (index < a.positional.size()) return &a.positional[index];
  for (auto& [k, v] : a.keyword)
    if (k == name) return &v;
  return nullptr;
}

// Rejects extra positional arguments and unknown keywords (Python's TypeError).
void check_args(const CallArgs& a, const std::string& fname, std::initializer_list<const char*> names) {
  if (a.positional.size() > names.size())
    fail(fname + "() takes at most " + std::to_string(names.size()) + " argument(s) (" +
         std::to_string(a.positional.size()) + " given)");
  for (auto& [k, v] : a.keyword) {
    size_t i = 0;
    bool known = false;
    for (const char* n : names) {
      if (k == n) {
        known = true;
        if (i < a.positional.size()) fail(fname + "() got multiple values for argument '" + k + "'");
      }
      ++i;
    }
    if (!known) fail(fname + "() got an unexpected keyword argument '" + k + "'");
  }
}

std::optional<std::string> opt_str_arg(const CallArgs& a, size_t i, const char* name) {
  const Value* v = get_arg(a, i, name);
  if (!v || v->is_none() || v->is_undefined()) return std::nullopt;
  if (!v->is_string()) fail(std::string("argument '") + name + "' must be a string, not " + type_name(*v));
  return v->str();
}

std::string str_arg(const CallArgs& a, size_t i, const char* name) {
  auto s = opt_str_arg(a, i, name);
  if (!s) fail(std::string("missing required argument '") + name + "'");
  return *s;
}

int64_t int_arg(const CallArgs& a, size_t i, const char* name, int64_t dflt) {
  const Value* v = get_arg(a, i, name);
  if (!v || v->is_none()) return dflt;
  if (!v->is_data() || !is_intlike(v->data)) fail(std::string("argument '") + name + "' must be an integer");
  return as_int(v->data);
}

bool bool_arg(const CallArgs& a, size_t i, const char* name, bool dflt) {
  const Value* v = get_arg(a, i, name);
  return v ? truthy(*v) : dflt;
}

// ---- attribute and item access (jinja2's environment.getattr / getitem) ----

Value get_attr(const Value& obj, const std::string& name);

Value bind_method(const Value& self, const std::string& name,
           std::function<Value(const Value& self, CallArgs&)> method) {
  return make_callable(name, [self, method](Renderer&, CallArgs& a) { return method(self, a); });
}

std::vector<std::string> split_args(const Value& self, CallArgs& a, bool from_right) {
  check_args(a, from_right ? "rsplit" : "split", {"sep", "maxsplit"});
  return py_split(self.str(), opt_str_arg(a, 0, "sep"), int_arg(a, 1, "maxsplit", -1), from_right);
}

Value strings_to_list(const std::vector<std::string>& parts) {
  Json arr = Json::array();
  for (auto& p : parts) arr.push_back(p);
  return Value(std::move(arr));
}

// startswith / endswith accept a string or a tuple (list) of strings.
bool affix_match(const Value& self, CallArgs& a, bool prefix) {
  const Value* v = get_arg(a, 0, prefix ? "prefix" : "suffix");
  if (!v || !v->is_data()) fail(std::string(prefix ? "startswith" : "endswith") + "() needs a string argument");
  std::vector<std::string> options;
  if (v->data.is_string()) options.push_back(v->str());
  else if (v->data.is_array())
    for (const Json& j : v->data) {
      if (!j.is_string()) fail("tuple for startswith/endswith must only contain str");
      options.push_back(j.get<std::string>());
    }
  else fail(std::string(prefix ? "startswith" : "endswith") + " first arg must be str or a tuple of str");
  const std::string& s = self.str();
  for (const std::string& o : options) {
    if (prefix ? s.compare(0, o.size(), o) == 0 && s.size() >= o.size()
               : s.size() >= o.size() && s.compare(s.size() - o.size(), o.size(), o) == 0)
      return true;
  }
  return false;
}

std::optional<Value> string_method(const Value& self, const std::string& name) {
  using M = std::function<Value(const Value&, CallArgs&)>;
  static const std::unordered_map<std::string, M> methods = {
      {"strip", [](const Value& s, CallArgs& a) { check_args(a, "strip", {"chars"}); return Value(Json(py_strip(s.str(), opt_str_arg(a, 0, "chars"), true, true))); }},
      {"lstrip", [](const Value& s, CallArgs& a) { check_args(a, "lstrip", {"chars"}); return Value(Json(py_strip(s.str(), opt_str_arg(a, 0, "chars"), true, false))); }},
      {"rstrip", [](const Value& s, CallArgs& a) { check_args(a, "rstrip", {"chars"}); return Value(Json(py_strip(s.str(), opt_str_arg(a, 0, "chars"), false, true))); }},
      {"split", [](const Value& s, CallArgs& a) { return strings_to_list(split_args(s, a, false)); }},
      {"rsplit", [](const Value& s, CallArgs& a) { return strings_to_list(split_args(s, a, true)); }},
      {"splitlines", [](const Value& s, CallArgs& a) { check_args(a, "splitlines", {"keepends"}); return strings_to_list(py_splitlines(s.str(), bool_arg(a, 0, "keepends", false))); }},
      {"startswith", [](const Value& s, CallArgs& a) { return Value(Json(affix_match(s, a, true))); }},
      {"endswith", [](const Value& s, CallArgs& a) { return Value(Json(affix_match(s, a, false))); }},
      {"upper", [](const Value& s, CallArgs& a) { check_args(a, "upper", {}); return Value(Json(py_upper(s.str()))); }},
      {"lower", [](const Value& s, CallArgs& a) { check_args(a, "lower", {}); return Value(Json(py_lower(s.str()))); }},
      {"title", [](const Value& s, CallArgs& a) { check_args(a, "title", {}); return Value(Json(py_title(s.str()))); }},
      {"capitalize", [](const Value& s, CallArgs& a) { check_args(a, "capitalize", {}); return Value(Json(py_capitalize(s.str()))); }},
      {"replace", [](const Value& s, CallArgs& a) {
         check_args(a, "replace", {"old", "new", "count"});
         return Value(Json(py_replace(s.str(), str_arg(a, 0, "old"), str_arg(a, 1, "new"), int_arg(a, 2, "count", -1))));
       }},
      {"find", [](const Value& s, CallArgs& a) {
         check_args(a, "find", {"sub"});
         size_t hit = s.str().find(str_arg(a, 0, "sub"));
         return Value(Json(hit == std::string::npos ? int64_t{-1} : static_cast<int64_t>(to_u32(s.str().substr(0, hit)).size())));
       }},
      {"count", [](const Value& s, CallArgs& a) {
         check_args(a, "count", {"sub"});
         std::string sub = str_arg(a, 0, "sub");
         if (sub.empty()) return Value(Json(static_cast<int64_t>(to_u32(s.str()).size()) + 1));
         int64_t n = 0;
         for (size_t p = s.str().find(sub); p != std::string::npos; p = s.str().find(sub, p + sub.size())) ++n;
         return Value(Json(n));
       }},
      {"join", [](const Value& s, CallArgs& a) {
         check_args(a, "join", {"iterable"});
         const Value* it = get_arg(a, 0, "iterable");
         if (!it) fail("join() takes exactly one argument");
         std::string out;
         bool first = true;
         for (const Value& v : iterate(*it)) {
           if (!v.is_string()) fail("sequence item: expected str instance, " + type_name(v) + " found");
           if (!first) out += s.str();
           first = false;
           out += v.str();
         }
         return Value(Json(out));
       }},
      {"removeprefix", [](const Value& s, CallArgs& a) {
         std::string p = str_arg(a, 0, "prefix");
         return Value(Json(s.str().compare(0, p.size(), p) == 0 ? s.str().substr(p.size()) : s.str()));
       }},
      {"removesuffix", [](const Value& s, CallArgs& a) {
         std::string p = str_arg(a, 0, "suffix");
         const std::string& t = s.str();
         bool hit = !p.empty() && t.size() >= p.size() && t.compare(t.size() - p.size(), p.size(), p) == 0;
         return Value(Json(hit ? t.substr(0, t.size() - p.size()) : t));
       }},
      {"isspace", [](const Value& s, CallArgs&) { auto u = to_u32(s.str()); return Value(Json(!u.empty() && std::all_of(u.begin(), u.end(), py_isspace))); }},
      {"isdigit", [](const Value& s, CallArgs&) { auto& t = s.str(); return Value(Json(!t.empty() && std::all_of(t.begin(), t.end(), [](char c) { return is_digit(c); }))); }},
      {"isalpha", [](const Value& s, CallArgs&) { auto u = to_u32(s.str()); return Value(Json(!u.empty() && std::all_of(u.begin(), u.end(), is_cased))); }},
  };
  auto it = methods.find(name);
  if (it == methods.end()) return std::nullopt;
  return bind_method(self, name, it->second);
}

Value dict_items(const Json& d) {
  Json arr = Json::array();
  for (auto it = d.begin(); it != d.end(); ++it) arr.push_back(Json::array({it.key(), it.value()}));
  return Value(std::move(arr));
}

std::optional<Value> dict_method(const Value& self, const std::string& name) {
  if (name == "items")
    return bind_method(self, name, [](const Value& d, CallArgs& a) { check_args(a, "items", {}); return dict_items(d.data); });
  if (name == "keys")
    return bind_method(self, name, [](const Value& d, CallArgs& a) {
      check_args(a, "keys", {});
      Json arr = Json::array();
      for (auto it = d.data.begin(); it != d.data.end(); ++it) arr.push_back(it.key());
      return Value(std::move(arr));
    });
  if (name == "values")
    return bind_method(self, name, [](const Value& d, CallArgs& a) {
      check_args(a, "values", {});
      Json arr = Json::array();
      for (auto it = d.data.begin(); it != d.data.end(); ++it) arr.push_back(it.value());
      return Value(std::move(arr));
    });
  if (name == "get")
    return bind_method(self, name, [](const Value& d, CallArgs& a) {
      check_args(a, "get", {"key", "default"});
      const Value* key = get_arg(a, 0, "key");
      if (!key) fail("get expected at least 1 argument, got 0");
      if (key->is_string()) {
        auto it = d.data.find(key->str());
        if (it != d.data.end()) return Value(*it);
      }
      const Value* dflt = get_arg(a, 1, "default");
      return dflt ? *dflt : Value(Json(nullptr));  // dict.get gives None, not undefined
    });
  return std::nullopt;
}

// Methods that mutate: the ImmutableSandboxedEnvironment refuses them.
bool is_mutating_method(const Json& j, const std::string& name) {
  static const char* list_methods[] = {"append", "extend", "insert", "pop", "remove", "clear", "sort", "reverse"};
  static const char* dict_methods[] = {"pop", "popitem", "setdefault", "update", "clear"};
  if (j.is_array()) return std::any_of(std::begin(list_methods), std::end(list_methods), [&](const char* m) { return name == m; });
  if (j.is_object()) return std::any_of(std::begin(dict_methods), std::end(dict_methods), [&](const char* m) { return name == m; });
  return false;
}

Value no_attribute(const Value& obj, const std::string& name) {
  return Value::undefined("'" + type_name(obj) + " object' has no attribute '" + name + "'");
}

// obj.name: Python attributes (methods) first, then dict keys, like jinja2's getattr.
Value get_attr(const Value& obj, const std::string& name) {
  switch (obj.kind) {
    case Value::Kind::Undefined: fail_undefined(obj);
    case Value::Kind::Object: {
      if (Value* v = obj.object->find(name)) return *v;
      return no_attribute(obj, name);
    }
    case Value::Kind::Callable: return no_attribute(obj, name);
    case Value::Kind::Data: break;
  }
  const Json& j = obj.data;
  if (is_mutating_method(j, name))
    return Value::undefined("access to attribute '" + name + "' of '" + py_type_name(j) + "' object is unsafe.");
  if (j.is_object()) {
    if (auto m = dict_method(obj, name)) return *m;
    auto it = j.find(name);
    if (it != j.end()) return Value(*it);
  } else if (j.is_string()) {
    if (auto m = string_method(obj, name)) return *m;
  }
  return no_attribute(obj, name);
}

// obj[key]: items first, then attributes for string keys, like jinja2's getitem.
Value get_item(const Value& obj, const Value& key) {
  if (obj.is_undefined()) fail_undefined(obj);
  if (key.is_undefined()) fail_undefined(key);
  if (obj.kind == Value::Kind::Object) {
    if (key.is_string()) return get_attr(obj, key.str());
    return Value::undefined("'" + type_name(obj) + " object' is not subscriptable");
  }
  if (!obj.is_data()) return Value::undefined("'" + type_name(obj) + "' object is not subscriptable");
  const Json& j = obj.data;
  if (key.is_data() && is_intlike(key.data) && (j.is_array() || j.is_string())) {
    int64_t i = as_int(key.data);
    if (j.is_array()) {
      int64_t n = static_cast<int64_t>(j.size());
      if (i < 0) i += n;
      if (i < 0 || i >= n) return Value::undefined("'list object' has no element " + std::to_string(as_int(key.data)));
      return Value(j[static_cast<size_t>(i)]);
    }
    std::u32string u = to_u32(j.get_ref<const std::string&>());
    int64_t n = static_cast<int64_t>(u.size());
    if (i < 0) i += n;
    if (i < 0 || i >= n) return Value::undefined("'str object' has no element " + std::to_string(as_int(key.data)));
    return Value(Json(to_utf8(u.substr(static_cast<size_t>(i), 1))));
  }
  if (j.is_object() && key.is_string()) {
    auto it = j.find(key.str());
    if (it != j.end()) return Value(*it);
  }
  if (key.is_string()) return get_attr(obj, key.str());
  return Value::undefined("'" + type_name(obj) + " object' has no element " + to_str(key));
}

// Attribute path of selectattr/map/sort/join: "a.b.0" looks up a, then b, then index 0.
Value get_path(const Value& obj, const std::string& path) {
  Value v = obj;
  size_t start = 0;
  while (true) {
    size_t dot = path.find('.', start);
    std::string part = path.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    bool numeric = !part.empty() && std::all_of(part.begin(), part.end(), [](char c) { return is_digit(c); });
    v = get_item(v, numeric ? Value(Json(std::stoll(part))) : Value(Json(part)));
    if (dot == std::string::npos) return v;
    start = dot + 1;
  }
}

Value slice(const Value& obj, std::optional<int64_t> b, std::optional<int64_t> e, std::optional<int64_t> step) {
  if (obj.is_undefined()) fail_undefined(obj);
  if (!obj.is_data()) return Value::undefined("object is not subscriptable");
  const Json& j = obj.data;
  if (j.is_array()) {
    Json out = Json::array();
    for (int64_t i : slice_indices(static_cast<int64_t>(j.size()), b, e, step)) out.push_back(j[static_cast<size_t>(i)]);
    return Value(std::move(out));
  }
  if (j.is_string()) {
    std::u32string u = to_u32(j.get_ref<const std::string&>());
    std::u32string out;
    for (int64_t i : slice_indices(static_cast<int64_t>(u.size()), b, e, step)) out += u[static_cast<size_t>(i)];
    Value r(Json(to_utf8(out)));
    r.safe = obj.safe;
    return r;
  }
  return Value::undefined("'" + type_name(obj) + "' object is not subscriptable");
}

// ---- operators (Python semantics) ----

[[noreturn]] void fail_operands(const char* op, const Value& a, const Value& b) {
  fail(std::string("unsupported operand type(s) for ") + op + ": '" + type_name(a) + "' and '" + type_name(b) + "'");
}

// Python integers never overflow; ours are 64-bit, so overflow is an error rather than a wrap.
template <typename Op>
int64_t checked(Op op, int64_t a, int64_t b) {
  int64_t r = 0;
  if (op(a, b, &r)) fail("integer overflow (Python's big integers are not supported)");
  return r;
}
bool add_ovf(int64_t a, int64_t b, int64_t* r) { return __builtin_add_overflow(a, b, r); }
bool sub_ovf(int64_t a, int64_t b, int64_t* r) { return __builtin_sub_overflow(a, b, r); }
bool mul_ovf(int64_t a, int64_t b, int64_t* r) { return __builtin_mul_overflow(a, b, r); }

Value add(const Value& a, const Value& b) {
  if (a.is_undefined()) fail_undefined(a);
  if (b.is_undefined()) fail_undefined(b);
  if (!a.is_data() || !b.is_data()) fail_operands("+", a, b);
  const Json &x = a.data, &y = b.data;
  if (is_number(x) && is_number(y)) {
    if (is_intlike(x) && is_intlike(y)) {
      return Value(Json(checked(add_ovf, as_int(x), as_int(y))));
    }
    return Value(Json(as_double(x) + as_double(y)));
  }
  if (x.is_string() && y.is_string()) {
    // markupsafe: Markup + str escapes the str, and str + Markup too (Markup.__radd__).
    if (a.safe || b.safe) {
      std::string l = a.safe ? a.str() : html_escape(a.str());
      std::string r = b.safe ? b.str() : html_escape(b.str());
      return Value::markup(l + r);
    }
    if (x.get_ref<const std::string&>().size() + y.get_ref<const std::string&>().size() > kMaxOutput)
      fail("string too long");
    return Value(Json(a.str() + b.str()));
  }
  if (x.is_array() && y.is_array()) {
    Json out = x;
    for (const Json& v : y) out.push_back(v);
    return Value(std::move(out));
  }
  if (x.is_string()) fail(std::string("can only concatenate str (not \"") + py_type_name(y) + "\") to str");
  if (x.is_array()) fail(std::string("can only concatenate list (not \"") + py_type_name(y) + "\") to list");
  fail_operands("+", a, b);
}

Value repeat(const Value& seq, int64_t n) {
  const Json& j = seq.data;
  if (n < 0) n = 0;
  if (j.is_string()) {
    if (static_cast<double>(j.get_ref<const std::string&>().size()) * static_cast<double>(n) > kMaxOutput) fail("string too long");
    std::string out;
    for (int64_t i = 0; i < n; ++i) out += j.get_ref<const std::string&>();
    Value r(Json(std::move(out)));
    r.safe = seq.safe;
    return r;
  }
  if (static_cast<double>(j.size()) * static_cast<double>(n) > 1e7) fail("list too long");
  Json out = Json::array();
  for (int64_t i = 0; i < n; ++i)
    for (const Json& v : j) out.push_back(v);
  return Value(std::move(out));
}

Value arith(const std::string& op, const Value& a, const Value& b) {
  if (op == "+") return add(a, b);
  if (op == "~") {
    std::string s = to_str(a) + to_str(b);
    if (s.size() > kMaxOutput) fail("string too long");
    return Value(Json(std::move(s)));
  }
  if (a.is_undefined()) fail_undefined(a);
  if (b.is_undefined()) fail_undefined(b);
  if (!a.is_data() || !b.is_data()) fail_operands(op.c_str(), a, b);
  const Json &x = a.data, &y = b.data;
  if (op == "*") {
    if ((x.is_string() || x.is_array()) && is_intlike(y)) return repeat(a, as_int(y));
    if ((y.is_string() || y.is_array()) && is_intlike(x)) return repeat(b, as_int(x));
  }
  if (op == "%" && x.is_string()) fail("printf-style string formatting ('%') is not supported");
  if (!is_number(x) || !is_number(y)) fail_operands(op.c_str(), a, b);
  bool ints = is_intlike(x) && is_intlike(y);
  if (op == "-") {
    if (ints) return Value(Json(checked(sub_ovf, as_int(x), as_int(y))));
    return Value(Json(as_double(x) - as_double(y)));
  }
  if (op == "*") {
    if (ints) return Value(Json(checked(mul_ovf, as_int(x), as_int(y))));
    return Value(Json(as_double(x) * as_double(y)));
  }
  if (op == "/") {
    if (as_double(y) == 0) fail("division by zero");
    return Value(Json(as_double(x) / as_double(y)));
  }
  if (op == "//" || op == "%") {
    if (ints) {
      int64_t p = as_int(x), q = as_int(y);
      if (q == 0) fail("integer division or modulo by zero");
      if (p == std::numeric_limits<int64_t>::min() && q == -1) fail("integer overflow");
      int64_t d = p / q, m = p % q;
      if (m != 0 && ((m < 0) != (q < 0))) {  // Python floors toward negative infinity
        d -= 1;
        m += q;
      }
      return Value(Json(op == "//" ? d : m));
    }
    double p = as_double(x), q = as_double(y);
    if (q == 0) fail(op == "//" ? "float floor division by zero" : "float modulo");
    // CPython's float_divmod.
    double m = std::fmod(p, q);
    double d = (p - m) / q;
    if (m != 0) {
      if ((q < 0) != (m < 0)) {
        m += q;
        d -= 1.0;
      }
    } else {
      m = std::copysign(0.0, q);
    }
    if (op == "%") return Value(Json(m));
    if (d != 0) {
      double f = std::floor(d);
      if (d - f > 0.5) f += 1.0;
      return Value(Json(f));
    }
    return Value(Json(std::copysign(0.0, p / q)));
  }
  if (op == "**") {
    if (ints && as_int(y) >= 0) {
      int64_t base = as_int(x), e = as_int(y), r = 1;
      for (int64_t i = 0; i < e; ++i) {
        r = checked(mul_ovf, r, base);
        if (r == 0 || r == 1) break;
      }
      return Value(Json(r));
    }
    if (as_double(x) == 0 && as_double(y) < 0) fail("0.0 cannot be raised to a negative power");
    return Value(Json(std::pow(as_double(x), as_double(y))));
  }
  fail("unknown operator " + op);
}

bool contains(const Value& container, const Value& item) {
  if (container.is_undefined()) return false;  // jinja2's Undefined iterates as empty
  if (!container.is_data()) fail("argument of type '" + type_name(container) + "' is not iterable");
  const Json& c = container.data;
  if (c.is_string()) {
    if (!item.is_string()) fail("'in <string>' requires string as left operand, not " + type_name(item));
    return c.get_ref<const std::string&>().find(item.str()) != std::string::npos;
  }
  if (c.is_array()) {
    for (const Json& v : c)
      if (values_equal(Value(v), item)) return true;
    return false;
  }
  if (c.is_object()) return item.is_string() && c.contains(item.str());
  fail("argument of type '" + std::string(py_type_name(c)) + "' is not iterable");
}

bool compare(const std::string& op, const Value& a, const Value& b) {
  if (op == "==") return values_equal(a, b);
  if (op == "!=") return !values_equal(a, b);
  if (op == "in") return contains(b, a);
  if (op == "not in") return !contains(b, a);
  if (a.is_undefined()) fail_undefined(a);
  if (b.is_undefined()) fail_undefined(b);
  if (!a.is_data() || !b.is_data())
    fail("'" + op + "' not supported between instances of '" + type_name(a) + "' and '" + type_name(b) + "'");
  int c = py_compare(a.data, b.data, op.c_str());
  if (c == 2) return false;  // nan
  if (op == "<") return c < 0;
  if (op == "<=") return c <= 0;
  if (op == ">") return c > 0;
  return c >= 0;
}

// ---- filters ----

// Python int(str, base): optional sign, digits with single underscores between them.
std::optional<int64_t> py_parse_int(const std::string& text, int base) {
  std::string t = py_strip(text, std::nullopt, true, true);
  size_t i = 0;
  bool neg = false;
  if (i < t.size() && (t[i] == '+' || t[i] == '-')) neg = t[i++] == '-';
  std::string digits;
  bool prev_digit = false;
  for (; i < t.size(); ++i) {
    char c = t[i];
    if (c == '_') {
      if (!prev_digit) return std::nullopt;
      prev_digit = false;
      continue;
    }
    int d = is_digit(c) ? c - '0' : std::isalpha(static_cast<unsigned char>(c)) ? std::tolower(c) - 'a' + 10 : 99;
    if (d >= base) return std::nullopt;
    digits += c;
    prev_digit = true;
  }
  if (digits.empty() || !prev_digit) return std::nullopt;
  uint64_t u = 0;
  auto [ptr, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), u, base);
  (void)ptr;
  if (ec != std::errc() || u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
    fail("integer too large (Python's big integers are not supported)");
  return neg ? -static_cast<int64_t>(u) : static_cast<int64_t>(u);
}

// Python float(str): decimal or exponent notation with '_' between digits, inf, infinity, nan.
std::optional<double> py_parse_float(const std::string& text) {
  std::string t = py_lower(py_strip(text, std::nullopt, true, true));
  std::string body = t.empty() || (t[0] != '+' && t[0] != '-') ? t : t.substr(1);
  if (body == "inf" || body == "infinity" || body == "nan") {
    double v = body == "nan" ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
    return !t.empty() && t[0] == '-' ? -v : v;
  }
  std::string clean;
  size_t i = 0, n = t.size();
  if (i < n && (t[i] == '+' || t[i] == '-')) clean += t[i++];
  auto digits = [&]() {
    size_t count = 0;
    while (i < n && (is_digit(t[i]) || (t[i] == '_' && count > 0 && i + 1 < n && is_digit(t[i + 1])))) {
      if (t[i] != '_') clean += t[i], ++count;
      ++i;
    }
    return count;
  };
  size_t int_digits = digits(), frac_digits = 0;
  if (i < n && t[i] == '.') {
    clean += t[i++];
    frac_digits = digits();
  }
  if (int_digits + frac_digits == 0) return std::nullopt;
  if (i < n && t[i] == 'e') {
    clean += t[i++];
    if (i < n && (t[i] == '+' || t[i] == '-')) clean += t[i++];
    if (digits() == 0) return std::nullopt;
  }
  if (i != n) return std::nullopt;
  return std::strtod(clean.c_str(), nullptr);
}

Value f_int(Renderer&, Value& v, CallArgs& a) {
  check_args(a, "int", {"default", "base"});
  const Value* dflt = get_arg(a, 0, "default");
  Value fallback = dflt ? *dflt : Value(Json(0));
  int base = static_cast<int>(int_arg(a, 1, "base", 10));
  if (!v.is_data()) return fallback;
  const Json& j = v.data;
  auto from_double = [&](double d) -> Value {
    if (std::isnan(d)) return fallback;
    if (std::isinf(d) || std::fabs(d) >= 9.2e18) fail("cannot convert float to integer");
    return Value(Json(static_cast<int64_t>(d)));  // truncation, like int()
  };
  if (is_intlike(j)) return Value(Json(as_int(j)));
  if (j.is_number_float()) return from_double(j.get<double>());
  if (j.is_string()) {
    if (auto i = py_parse_int(j.get<std::string>(), base)) return Value(Json(*i));
    if (auto d = py_parse_float(j.get<std::string>())) return from_double(*d);  // "42.23"|int is 42
  }
  return fallback;
}

Value f_float(Renderer&, Value& v, CallArgs& a) {
  check_args(a, "float", {"default"});
  const Value* dflt = get_arg(a, 0, "default");
  Value fallback = dflt ? *dflt : Value(Json(0.0));
  if (!v.is_data()) return fallback;
  const Json& j = v.data;
  if (is_number(j)) return Value(Json(as_double(j)));
  if (j.is_string())
    if (auto d = py_parse_float(j.get<std::string>())) return Value(Json(*d));
  return fallback;
}

Value f_string(Renderer&, Value& v, CallArgs& a) {
  check_args(a, "string", {});
  if (v.safe) return v;
  return Value(Json(to_str(v)));
}

Value f_safe(Renderer&, Value& v, CallArgs& a) {
  check_args(a, "safe", {});
  return Value::markup(to_str(v));
}

Value f_escape(Renderer&, Value& v, CallArgs& a) {
  check_args(a, "escape", {});
  if (v.safe) return v;
  return Value::markup(html_escape(to_str(v)));
}

Value f_length(Renderer&, Value& v, CallArgs& a) {
  check_args(a, "length", {});
  return Value(Json(length_of(v)));
}

Value f_list(Renderer&, Value& v, CallArgs& a) {
  check_args(a, "list", {});
  return make_list(iterate(v));
}

Value f_trim(Renderer&, Value& v, CallArgs& a) {
  check_args(a, "trim", {"chars"});
  return Value(Json(py_strip(to_str(v), opt_str_arg(a, 0, "chars"), true, true)));
}

Value f_upper(Renderer&, Value& v, CallArgs& a) {
  check_args(a, "upper", {});
  return Value(Json(py_upper(to_str(v))));
}

Value f_lower(Renderer&, Value& v, CallArgs& a) {
  check_args(a, "lower", {});
  return Value(Json(py_lower(to_str(v))));
}

Value f_capitalize(Renderer&, Value& v, CallArgs& a) {
  check_args(a, "capitalize", {});
  return Value(Json(py_capitalize(to_str(v))));
}

// jinja2's title filter: a letter after start, whitespace, '-', or an opening bracket goes upper.
Value f_title(Renderer&, Value& v, CallArgs& a) {
  check_args(a, "title", {});
  std::string out;
  bool word_start = true;
  for (char32_t c : to_u32(to_str(v))) {
    bool sep = py_isspace(c) || c == '-' || c == '(' || c == '{' || c == '[' || c == '<';
    if (sep || !word_start) append_utf8(out, to_lower_cp(c));
    else out += py_upper(to_utf8(std::u32string(1, c)));
    word_start = sep;
  }
  return Value(Json(out));
}

Value f_default(Renderer&, Value& v, CallArgs& a) {
  check_args(a, "default", {"default_value", "boolean"});
  const Value* dflt = get_arg(a, 0, "default_value");
  if (v.is_undefined() || (bool_arg(a, 1, "boolean", false) && !truthy(v))) return dflt ? *dflt : Value(Json(""));
  return v;
}

Value f_first(Renderer&, Value& v, CallArgs& a) {
  check_args(a, "first", {});
  auto items = iterate(v);
  if (items.empty()) return Value::undefined("No first item, sequence was empty.");
  return items.front();
}

Value f_last(Renderer&, Value& v, CallArgs& a) {
  check_args(a, "last", {});
  auto items = iterate(v);
  if (items.empty()) return Value::undefined("No last item, sequence was empty.");
  return items.back();
}

Value f_join(Renderer&, Value& v, CallArgs& a) {
  check_args(a, "join", {"d", "attribute"});
  std::string sep = opt_str_arg(a, 0, "d").value_or("");
  auto attribute = opt_str_arg(a, 1, "attribute");
  std::string out;
  bool first = true;
  for (const Value& item : iterate(v)) {
    if (!first) out += sep;
    first = false;
    out += to_str(attribute ? get_path(item, *attribute) : item);
  }
  return Value(Json(out));
}

Value f_reverse(Renderer&, Value& v, CallArgs& a) {
  check_args(a, "reverse", {});
  if (v.is_string()) return slice(v, std::nullopt, std::nullopt, -1);
  auto items = iterate(v);
  std::reverse(items.begin(), items.end());
  return make_list(items);
}

Value f_replace(Renderer&, Value& v, CallArgs& a) {
  check_args(a, "replace", {"old", "new", "count"});
  const Value* o = get_arg(a, 0, "old");
  const Value* n = get_arg(a, 1, "new");
  if (!o || !n) fail("replace() needs 'old' and 'new'");
  return Value(Json(py_replace(to_str(v), to_str(*o), to_str(*n), int_arg(a, 2, "count", -1))));
}

Value f_abs(Renderer&, Value& v, CallArgs& a) {
  check_args(a, "abs", {});
  if (!v.is_data() || !is_number(v.data)) fail("bad operand type for abs(): '" + type_name(v) + "'");
  if (is_intlike(v.data)) {
    int64_t i = as_int(v.data);
    if (i == std::numeric_limits<int64_t>::min()) fail("integer overflow");
    return Value(Json(i < 0 ? -i : i));
  }
  return Value(Json(std::fabs(v.data.get<double>())));
}

Value f_round(Renderer&, Value& v, CallArgs& a) {
  check_args(a, "round", {"precision", "method"});
  int64_t precision = int_arg(a, 0, "precision", 0);
  std::string method = opt_str_arg(a, 1, "method").value_or("common");
  if (method != "common" && method != "ceil" && method != "floor")
    fail("method must be 'common', 'ceil' or 'floor'");
  if (!v.is_data() || !is_number(v.data)) fail("type " + type_name(v) + " doesn't define __round__ method");
  if (method == "common") {
    if (is_intlike(v.data) && precision >= 0) return Value(Json(as_int(v.data)));  // round(int, n) stays int
    double d = as_double(v.data);
    if (precision >= 0 && precision < 300) {
      // printf rounds the exact binary value half-to-even, as Python's round() does.
      char buf[512];
      std::snprintf(buf, sizeof(buf), "%.*f", static_cast<int>(precision), d);
      return Value(Json(std::strtod(buf, nullptr)));
    }
    double scale = std::pow(10.0, static_cast<double>(-precision));
    return Value(Json(std::nearbyint(d / scale) * scale));
  }
  double scale = std::pow(10.0, static_cast<double>(precision));
  double d = as_double(v.data) * scale;
  return Value(Json((method == "ceil" ? std::ceil(d) : std::floor(d)) / scale));
}

Value f_sum(Renderer&, Value& v, CallArgs& a) {
  check_args(a, "sum", {"attribute", "start"});
  auto attribute = opt_str_arg(a, 0, "attribute");
  const Value* start = get_arg(a, 1, "start");
  Value total = start ? *start : Value(Json(0));
  for (const Value& item : iterate(v)) total = add(total, attribute ? get_path(item, *attribute) : item);
  return total;
}

Value f_items(Renderer&, Value& v, CallArgs& a) {
  check_args(a, "items", {});
  if (v.is_undefined()) return Value(Json::array());
  if (!v.is_data() || !v.data.is_object()) fail("Can only get item pairs from a mapping.");
  return dict_items(v.data);
}

// transformers' tojson: json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False).
Value f_tojson(Renderer&, Value& v, CallArgs& a) {
  check_args(a, "tojson", {"ensure_ascii", "indent", "separators", "sort_keys"});
  if (!v.is_data()) fail("Object of type " + type_name(v) + " is not JSON serializable");
  DumpOptions opt;
  opt.ensure_ascii = bool_arg(a, 0, "ensure_ascii", false);
  opt.sort_keys = bool_arg(a, 3, "sort_keys", false);
  if (const Value* ind = get_arg(a, 1, "indent"); ind && !ind->is_none()) {
    if (ind->is_string()) opt.indent = ind->str();
    else if (ind->is_data() && is_intlike(ind->data)) opt.indent = std::string(std::max<int64_t>(0, std::min<int64_t>(as_int(ind->data), 1000)), ' ');
    else fail("indent must be an integer or a string");
    opt.item_sep = ",";
  }
  if (const Value* sep = get_arg(a, 2, "separators"); sep && !sep->is_none()) {
    if (!sep->is_data() || !sep->data.is_array() || sep->data.size() != 2 || !sep->data[0].is_string() ||
        !sep->data[1].is_string())
      fail("separators must be a pair of strings");
    opt.item_sep = sep->data[0].get<std::string>();
    opt.key_sep = sep->data[1].get<std::string>();
  }
  std::string out;
  json_dump_into(out, v.data, opt, 0);
  return Value(Json(out));
}

// jinja2's indent: later lines get `width` (spaces, or the string itself); blank lines stay empty.
Value f_indent(Renderer&, Value& v, CallArgs& a) {
  check_args(a, "indent", {"width", "first", "blank"});
  std::string pad = "    ";
  if (const Value* w = get_arg(a, 0, "width")) {
    if (w->is_string()) pad = w->str();
    else pad = std::string(std::max<int64_t>(0, int_arg(a, 0, "width", 4)), ' ');
  }
  bool first = bool_arg(a, 1, "first", false), blank = bool_arg(a, 2, "blank", false);
  // jinja2 appends "\n" before splitlines() so a trailing newline is dropped, not indented.
  std::vector<std::string> lines = py_splitlines(to_str(v) + "\n", false);
  std::string out = lines.empty() ? "" : lines[0];
  for (size_t i = 1; i < lines.size(); ++i) {
    out += "\n";
    if (blank || !lines[i].empty()) out += pad;
    out += lines[i];
  }
  if (first) out = pad + out;
  return Value(Json(out));
}

// Sort key for sort/unique: the attribute path, lower-cased strings unless case_sensitive.
Json sort_key(const Value& item, const std::optional<std::string>& attribute, bool case_sensitive) {
  Value k = attribute ? get_path(item, *attribute) : item;
  Json j = to_json(k);
  if (!case_sensitive && j.is_string()) return Json(py_lower(j.get<std::string>()));
  return j;
}

Value f_sort(Renderer&, Value& v, CallArgs& a) {
  check_args(a, "sort", {"reverse", "case_sensitive", "attribute"});
  bool reverse = bool_arg(a, 0, "reverse", false), cs = bool_arg(a, 1, "case_sensitive", false);
  auto attribute = opt_str_arg(a, 2, "attribute");
  auto items = iterate(v);
  std::vector<std::pair<Json, Value>> keyed;
  for (auto& it : items) keyed.emplace_back(sort_key(it, attribute, cs), it);
  std::stable_sort(keyed.begin(), keyed.end(), [&](const auto& x, const auto& y) {
    return reverse ? py_compare(y.first, x.first, "<") == -1 : py_compare(x.first, y.first, "<") == -1;
  });
  std::vector<Value> out;
  for (auto& [k, it] : keyed) out.push_back(it);
  return make_list(out);
}

Value f_unique(Renderer&, Value& v, CallArgs& a) {
  check_args(a, "unique", {"case_sensitive", "attribute"});
  bool cs = bool_arg(a, 0, "case_sensitive", false);
  auto attribute = opt_str_arg(a, 1, "attribute");
  std::vector<Json> seen;
  std::vector<Value> out;
  for (const Value& it : iterate(v)) {
    Json k = sort_key(it, attribute, cs);
    if (std::any_of(seen.begin(), seen.end(), [&](const Json& s) { return py_equal(s, k); })) continue;
    seen.push_back(k);
    out.push_back(it);
  }
  return make_list(out);
}

Value min_max(Value& v, CallArgs& a, const char* name, bool want_max) {
  check_args(a, name, {"case_sensitive", "attribute"});
  bool cs = bool_arg(a, 0, "case_sensitive", false);
  auto attribute = opt_str_arg(a, 1, "attribute");
  std::optional<Value> best;
  Json best_key;
  for (const Value& it : iterate(v)) {
    Json k = sort_key(it, attribute, cs);
    if (!best || py_compare(k, best_key, want_max ? ">" : "<") == (want_max ? 1 : -1)) {
      best = it;
      best_key = k;
    }
  }
  if (!best) return Value::undefined(std::string("No aggregated item, sequence was empty."));
  return *best;
}
Value f_min(Renderer&, Value& v, CallArgs& a) { return min_max(v, a, "min", false); }
Value f_max(Renderer&, Value& v, CallArgs& a) { return min_max(v, a, "max", true); }

// dictsort: [key, value] pairs sorted by key (or by='value').
Value f_dictsort(Renderer&, Value& v, CallArgs& a) {
  check_args(a, "dictsort", {"case_sensitive", "by", "reverse"});
  if (!v.is_data() || !v.data.is_object()) fail("dictsort: can only sort a mapping");
  bool cs = bool_arg(a, 0, "case_sensitive", false), reverse = bool_arg(a, 2, "reverse", false);
  std::string by = opt_str_arg(a, 1, "by").value_or("key");
  if (by != "key" && by != "value") fail("You can only sort by either \"key\" or \"value\"");
  Json pairs = dict_items(v.data).data;
  std::vector<Json> items(pairs.begin(), pairs.end());
  auto key = [&](const Json& p) {
    const Json& k = p[by == "key" ? 0 : 1];
    return !cs && k.is_string() ? Json(py_lower(k.get<std::string>())) : k;
  };
  std::stable_sort(items.begin(), items.end(), [&](const Json& x, const Json& y) {
    return reverse ? py_compare(key(y), key(x), "<") == -1 : py_compare(key(x), key(y), "<") == -1;
  });
  return Value(Json(items));
}

bool run_test(Renderer& r, const std::string& name, const Value& v, CallArgs& args) {
  const TestDef* t = find_test(name);
  if (!t) fail("no test named '" + name + "'");
  return t->fn(r, v, args);
}

// select / reject / selectattr / rejectattr: keep the items whose test result is `keep`.
Value select_items(Renderer& r, Value& v, CallArgs& a, bool by_attribute, bool keep) {
  if (!a.keyword.empty()) fail("select filters take positional arguments only");
  size_t i = 0;
  std::optional<std::string> attribute;
  if (by_attribute) {
    if (a.positional.empty() || !a.positional[0].is_string()) fail("selectattr/rejectattr need an attribute name");
    attribute = a.positional[0].str();
    i = 1;
  }
  std::optional<std::string> test;
  if (i < a.positional.size()) {
    if (!a.positional[i].is_string()) fail("the test name must be a string");
    test = a.positional[i].str();
    ++i;
  }
  CallArgs test_args;
  test_args.positional.assign(a.positional.begin() + static_cast<std::ptrdiff_t>(std::min(i, a.positional.size())),
                              a.positional.end());
  std::vector<Value> out;
  for (const Value& item : iterate(v)) {
    Value subject = attribute ? get_path(item, *attribute) : item;
    bool ok = test ? run_test(r, *test, subject, test_args) : truthy(subject);
    if (ok == keep) out.push_back(item);
  }
  return make_list(out);
}
Value f_select(Renderer& r, Value& v, CallArgs& a) { return select_items(r, v, a, false, true); }
Value f_reject(Renderer& r, Value& v, CallArgs& a) { return select_items(r, v, a, false, false); }
Value f_selectattr(Renderer& r, Value& v, CallArgs& a) { return select_items(r, v, a, true, true); }
Value f_rejectattr(Renderer& r, Value& v, CallArgs& a) { return select_items(r, v, a, true, false); }

// map(attribute='x', default=...) or map('filter', args...)
Value f_map(Renderer& r, Value& v, CallArgs& a) {
  std::vector<Value> out;
  const Value* attribute = nullptr;  // keyword only
  for (auto& [k, val] : a.keyword)
    if (k == "attribute") attribute = &val;
  if (attribute) {
    const Value* dflt = nullptr;
    for (auto& [k, val] : a.keyword) {
      if (k == "default") dflt = &val;
      else if (k != "attribute") fail("map() got an unexpected keyword argument '" + k + "'");
    }
    if (!attribute->is_string()) fail("map attribute must be a string");
    for (const Value& item : iterate(v)) {
      Value x = get_path(item, attribute->str());
      out.push_back(x.is_undefined() && dflt ? *dflt : x);
    }
    return make_list(out);
  }
  if (a.positional.empty() || !a.positional[0].is_string()) fail("map() needs a filter name or attribute=");
  const FilterDef* f = find_filter(a.positional[0].str());
  if (!f) fail("no filter named '" + a.positional[0].str() + "'");
  for (const Value& item : iterate(v)) {
    CallArgs rest;
    rest.positional.assign(a.positional.begin() + 1, a.positional.end());
    rest.keyword = a.keyword;
    Value x = item;
    out.push_back(f->fn(r, x, rest));
  }
  return make_list(out);
}

const FilterDef* find_filter(const std::string& name) {
  static const std::unordered_map<std::string, FilterDef> filters = {
      {"abs", {f_abs}},           {"capitalize", {f_capitalize}}, {"count", {f_length}},
      {"d", {f_default}},         {"default", {f_default}},       {"dictsort", {f_dictsort}},
      {"e", {f_escape}},          {"max", {f_max}},               {"min", {f_min}},
      {"escape", {f_escape}},     {"first", {f_first}},           {"float", {f_float}},
      {"indent", {f_indent}},     {"int", {f_int}},               {"items", {f_items}},
      {"join", {f_join}},         {"last", {f_last}},             {"length", {f_length}},
      {"list", {f_list}},         {"lower", {f_lower}},           {"map", {f_map}},
      {"reject", {f_reject}},     {"rejectattr", {f_rejectattr}}, {"replace", {f_replace}},
      {"reverse", {f_reverse}},   {"round", {f_round}},           {"safe", {f_safe}},
      {"select", {f_select}},     {"selectattr", {f_selectattr}}, {"sort", {f_sort}},
      {"string", {f_string}},     {"sum", {f_sum}},               {"title", {f_title}},
      {"tojson", {f_tojson}},     {"trim", {f_trim}},             {"unique", {f_unique}},
      {"upper", {f_upper}},
  };
  auto it = filters.find(name);
  return it == filters.end() ? nullptr : &it->second;
}

// ---- tests ----

const Value& test_operand(const CallArgs& a, const char* test) {
  if (a.positional.empty()) fail(std::string("test '") + test + "' needs an argument");
  return a.positional[0];
}

bool is_data_of(const Value& v, bool (Json::*pred)() const noexcept) { return v.is_data() && (v.data.*pred)(); }

const TestDef* find_test(const std::string& name) {
  using T = TestDef;
  static const std::unordered_map<std::string, TestDef> tests = {
      {"defined", T{[](Renderer&, const Value& v, CallArgs&) { return !v.is_undefined(); }}},
      {"undefined", T{[](Renderer&, const Value& v, CallArgs&) { return v.is_undefined(); }}},
      {"none", T{[](Renderer&, const Value& v, CallArgs&) { return v.is_none(); }}},
      {"boolean", T{[](Renderer&, const Value& v, CallArgs&) { return is_data_of(v, &Json::is_boolean); }}},
      {"true", T{[](Renderer&, const Value& v, CallArgs&) { return is_data_of(v, &Json::is_boolean) && v.data.get<bool>(); }}},
      {"false", T{[](Renderer&, const Value& v, CallArgs&) { return is_data_of(v, &Json::is_boolean) && !v.data.get<bool>(); }}},
      {"integer", T{[](Renderer&, const Value& v, CallArgs&) { return is_data_of(v, &Json::is_number_integer); }}},
      {"float", T{[](Renderer&, const Value& v, CallArgs&) { return is_data_of(v, &Json::is_number_float); }}},
      {"number", T{[](Renderer&, const Value& v, CallArgs&) { return v.is_data() && is_number(v.data); }}},
      {"string", T{[](Renderer&, const Value& v, CallArgs&) { return v.is_string(); }}},
      {"mapping", T{[](Renderer&, const Value& v, CallArgs&) { return is_data_of(v, &Json::is_object); }}},
      // jinja2's Undefined is iterable (empty) and has __len__/__getitem__, so it passes these two.
      {"iterable", T{[](Renderer&, const Value& v, CallArgs&) {
         return v.is_undefined() || (v.is_data() && (v.data.is_string() || v.data.is_array() || v.data.is_object()));
       }}},
      {"sequence", T{[](Renderer&, const Value& v, CallArgs&) {
         return v.is_undefined() || (v.is_data() && (v.data.is_string() || v.data.is_array() || v.data.is_object()));
       }}},
      {"callable", T{[](Renderer&, const Value& v, CallArgs&) { return v.kind == Value::Kind::Callable || v.is_undefined(); }}},
      {"escaped", T{[](Renderer&, const Value& v, CallArgs&) { return v.safe; }}},
      {"sameas", T{[](Renderer&, const Value& v, CallArgs& a) {
         const Value& o = test_operand(a, "sameas");
         if (v.is_data() && o.is_data() && (v.data.is_null() || v.data.is_boolean() || v.data.is_number_integer() ||
                                            v.data.is_string()))
           return v.data.type() == o.data.type() && v.data == o.data;  // singletons, cached ints, interned strs
         return v.kind != Value::Kind::Data && values_equal(v, o);
       }}},
      {"in", T{[](Renderer&, const Value& v, CallArgs& a) { return contains(test_operand(a, "in"), v); }}},
      {"odd", T{[](Renderer&, const Value& v, CallArgs&) {
         if (!v.is_data() || !is_intlike(v.data)) fail("test 'odd' needs an integer");
         return as_int(v.data) % 2 != 0;
       }}},
      {"even", T{[](Renderer&, const Value& v, CallArgs&) {
         if (!v.is_data() || !is_intlike(v.data)) fail("test 'even' needs an integer");
         return as_int(v.data) % 2 == 0;
       }}},
      {"divisibleby", T{[](Renderer&, const Value& v, CallArgs& a) {
         const Value& n = test_operand(a, "divisibleby");
         if (!v.is_data() || !is_intlike(v.data) || !n.is_data() || !is_intlike(n.data) || as_int(n.data) == 0)
           fail("test 'divisibleby' needs non-zero integers");
         return as_int(v.data) % as_int(n.data) == 0;
       }}},
      {"lower", T{[](Renderer&, const Value& v, CallArgs&) { auto s = to_str(v); return py_lower(s) == s && py_upper(s) != s; }}},
      {"upper", T{[](Renderer&, const Value& v, CallArgs&) { auto s = to_str(v); return py_upper(s) == s && py_lower(s) != s; }}},
  };
  static const std::unordered_map<std::string, std::string> comparisons = {
      {"eq", "=="}, {"equalto", "=="}, {"==", "=="}, {"ne", "!="}, {"!=", "!="}, {"lt", "<"}, {"lessthan", "<"},
      {"<", "<"},   {"le", "<="},      {"<=", "<="}, {"gt", ">"},  {"greaterthan", ">"}, {">", ">"},
      {"ge", ">="}, {">=", ">="}};
  static const std::unordered_map<std::string, TestDef> comparison_tests = [] {
    std::unordered_map<std::string, TestDef> m;
    m["=="] = {[](Renderer&, const Value& v, CallArgs& a) { return compare("==", v, test_operand(a, "eq")); }};
    m["!="] = {[](Renderer&, const Value& v, CallArgs& a) { return compare("!=", v, test_operand(a, "ne")); }};
    m["<"] = {[](Renderer&, const Value& v, CallArgs& a) { return compare("<", v, test_operand(a, "lt")); }};
    m["<="] = {[](Renderer&, const Value& v, CallArgs& a) { return compare("<=", v, test_operand(a, "le")); }};
    m[">"] = {[](Renderer&, const Value& v, CallArgs& a) { return compare(">", v, test_operand(a, "gt")); }};
    m[">="] = {[](Renderer&, const Value& v, CallArgs& a) { return compare(">=", v, test_operand(a, "ge")); }};
    return m;
  }();
  if (auto it = tests.find(name); it != tests.end()) return &it->second;
  if (auto it = comparisons.find(name); it != comparisons.end()) return &comparison_tests.at(it->second);
  return nullptr;
}

// ---- the renderer ----

Value lookup(Scope* scope, const std::string& name) {
  for (Scope* s = scope; s; s = s->parent) {
    auto it = s->vars.find(name);
    if (it != s->vars.end()) return it->second;
  }
  return Value::undefined("'" + name + "' is undefined");
}

std::optional<int64_t> slice_bound(const Value& v) {
  if (v.is_none()) return std::nullopt;
  if (!v.is_data() || !is_intlike(v.data)) fail("slice indices must be integers or None");
  return as_int(v.data);
}

CallArgs Renderer::eval_args(const Expr& e, size_t first, Scope* scope) {
  CallArgs a;
  for (size_t i = first; i < e.args.size(); ++i) a.positional.push_back(eval(*e.args[i], scope));
  for (auto& [k, x] : e.kwargs) a.keyword.emplace_back(k, eval(*x, scope));
  return a;
}

Value Renderer::call(const Value& callee, CallArgs& args) {
  if (callee.is_undefined()) fail_undefined(callee);
  if (callee.kind != Value::Kind::Callable) fail("'" + type_name(callee) + "' object is not callable");
  return callee.callable->fn(*this, args);
}

Value Renderer::apply_filter(const Expr& f, Value subject, Scope* scope) {
  CallArgs a = eval_args(f, 1, scope);
  return f.filter->fn(*this, subject, a);
}

Value Renderer::eval(const Expr& e, Scope* scope) {
  switch (e.k) {
    case Expr::K::Const: return Value(e.value);
    case Expr::K::Name: return lookup(scope, e.name);
    case Expr::K::List:
    case Expr::K::Tuple: {
      Json arr = Json::array();
      for (auto& x : e.args) arr.push_back(to_json(eval(*x, scope)));
      return Value(std::move(arr));
    }
    case Expr::K::Dict: {
      Json obj = Json::object();
      for (size_t i = 0; i + 1 < e.args.size(); i += 2) {
        Value k = eval(*e.args[i], scope);
        if (!k.is_string()) fail("dict keys must be strings here, not " + type_name(k));
        obj[k.str()] = to_json(eval(*e.args[i + 1], scope));
      }
      return Value(std::move(obj));
    }
    case Expr::K::GetAttr: return get_attr(eval(*e.args[0], scope), e.name);
    case Expr::K::GetItem: return get_item(eval(*e.args[0], scope), eval(*e.args[1], scope));
    case Expr::K::Slice: {
      Value obj = eval(*e.args[0], scope);
      std::optional<int64_t> b[3];
      for (int i = 0; i < 3; ++i)
        if (e.args[i + 1]) b[i] = slice_bound(eval(*e.args[i + 1], scope));
      return slice(obj, b[0], b[1], b[2]);
    }
    case Expr::K::Call: {
      Value callee = eval(*e.args[0], scope);
      CallArgs a = eval_args(e, 1, scope);
      return call(callee, a);
    }
    case Expr::K::Filter: return apply_filter(e, eval(*e.args[0], scope), scope);
    case Expr::K::Test: {
      Value subject = eval(*e.args[0], scope);
      CallArgs a = eval_args(e, 1, scope);
      return Value(Json(e.test->fn(*this, subject, a)));
    }
    case Expr::K::Not: return Value(Json(!truthy(eval(*e.args[0], scope))));
    case Expr::K::Neg:
    case Expr::K::Pos: {
      Value v = eval(*e.args[0], scope);
      if (v.is_undefined()) fail_undefined(v);
      if (!v.is_data() || !is_number(v.data))
        fail(std::string("bad operand type for unary ") + (e.k == Expr::K::Neg ? "-" : "+") + ": '" + type_name(v) + "'");
      if (e.k == Expr::K::Pos) return is_intlike(v.data) ? Value(Json(as_int(v.data))) : v;
      if (is_intlike(v.data)) return arith("-", Value(Json(0)), v);
      return Value(Json(-v.data.get<double>()));
    }
    case Expr::K::Binary: return arith(e.name, eval(*e.args[0], scope), eval(*e.args[1], scope));
    case Expr::K::And: {  // Python: the deciding operand itself, not a bool
      Value l = eval(*e.args[0], scope);
      return truthy(l) ? eval(*e.args[1], scope) : l;
    }
    case Expr::K::Or: {
      Value l = eval(*e.args[0], scope);
      return truthy(l) ? l : eval(*e.args[1], scope);
    }
    case Expr::K::Compare: {  // chained like Python: a < b < c is a < b and b < c
      Value left = eval(*e.args[0], scope);
      for (size_t i = 0; i < e.ops.size(); ++i) {
        Value right = eval(*e.args[i + 1], scope);
        if (!compare(e.ops[i], left, right)) return Value(Json(false));
        left = std::move(right);
      }
      return Value(Json(true));
    }
    case Expr::K::Cond: {
      if (truthy(eval(*e.args[0], scope))) return eval(*e.args[1], scope);
      if (e.args[2]) return eval(*e.args[2], scope);
      return Value::undefined("the inline if-expression evaluated to false and no else section was defined.");
    }
  }
  fail("unknown expression");
}

// Binds `names` to v (several names: unpack v like Python's tuple assignment).
void Renderer::assign(Scope* scope, const std::vector<std::string>& names, const Value& v) {
  if (names.size() == 1) {
    scope->vars[names[0]] = v;
    return;
  }
  std::vector<Value> items = iterate(v);
  if (items.size() != names.size()) {
    if (items.size() > names.size()) fail("too many values to unpack (expected " + std::to_string(names.size()) + ")");
    fail("not enough values to unpack (expected " + std::to_string(names.size()) + ", got " +
         std::to_string(items.size()) + ")");
  }
  for (size_t i = 0; i < names.size(); ++i) scope->vars[names[i]] = items[i];
}

Flow Renderer::exec(const Body& body, Scope* scope, std::string& out) {
  for (const StmtPtr& s : body) {
    Flow f;
    try {
      f = exec_one(*s, scope, out);
    } catch (const Failure& failure) {
      throw Error("chat template error at line " + std::to_string(s->line) + ": " + failure.message);
    }
    if (f != Flow::Normal) return f;
    if (out.size() > kMaxOutput) throw Error("chat template error: output larger than 256 MiB");
  }
  return Flow::Normal;
}

// RAII depth counter for macro calls and nested renders.
struct DepthGuard {
  explicit DepthGuard(int& d) : depth(d) {
    if (++depth > kMaxCallDepth) {
      --depth;
      fail("maximum recursion depth exceeded");
    }
  }
  ~DepthGuard() { --depth; }
  int& depth;
};

Value loop_object(const std::vector<Value>& items, size_t i) {
  auto obj = std::make_shared<Object>();
  int64_t n = static_cast<int64_t>(items.size()), k = static_cast<int64_t>(i);
  obj->set("index", Json(k + 1));
  obj->set("index0", Json(k));
  obj->set("revindex", Json(n - k));
  obj->set("revindex0", Json(n - k - 1));
  obj->set("first", Json(k == 0));
  obj->set("last", Json(k == n - 1));
  obj->set("length", Json(n));
  obj->set("depth", Json(1));
  obj->set("depth0", Json(0));
  if (i > 0) obj->set("previtem", items[i - 1]);
  if (i + 1 < items.size()) obj->set("nextitem", items[i + 1]);
  obj->set("cycle", make_callable("cycle", [k](Renderer&, CallArgs& a) {
    if (a.positional.empty()) fail("no items for cycling given");
    return a.positional[static_cast<size_t>(k) % a.positional.size()];
  }));
  Value v;
  v.kind = Value::Kind::Object;
  v.object = std::move(obj);
  return v;
}

Flow Renderer::exec_one(const Stmt& s, Scope* scope, std::string& out) {
  switch (s.k) {
    case Stmt::K::Text: out += s.text; return Flow::Normal;
    case Stmt::K::Output: out += to_str(eval(*s.expr, scope)); return Flow::Normal;
    case Stmt::K::If:
      for (auto& [c, body] : s.branches)
        if (truthy(eval(*c, scope))) return exec(body, scope, out);
      return exec(s.else_body, scope, out);
    case Stmt::K::For: {
      std::vector<Value> items = iterate(eval(*s.expr, scope));
      if (s.cond) {  // `for x in y if cond` filters first, so loop.length counts what is kept
        std::vector<Value> kept;
        for (Value& v : items) {
          Scope* probe = new_scope(scope);
          assign(probe, s.targets, v);
          if (truthy(eval(*s.cond, probe))) kept.push_back(std::move(v));
        }
        items = std::move(kept);
      }
      if (items.empty()) return exec(s.else_body, new_scope(scope), out);
      for (size_t i = 0; i < items.size(); ++i) {
        Scope* iteration = new_scope(scope);
        assign(iteration, s.targets, items[i]);
        iteration->vars["loop"] = loop_object(items, i);
        if (exec(s.body, iteration, out) == Flow::Break) break;
      }
      return Flow::Normal;
    }
    case Stmt::K::Set: assign(scope, s.targets, eval(*s.expr, scope)); return Flow::Normal;
    case Stmt::K::SetAttr: {
      Value ns = lookup(scope, s.text);
      if (ns.kind != Value::Kind::Object || !ns.object->is_namespace)
        fail("cannot assign attribute on non-namespace object");
      ns.object->set(s.attr, eval(*s.expr, scope));
      return Flow::Normal;
    }
    case Stmt::K::SetBlock:
    case Stmt::K::FilterBlock: {
      std::string text;
      if (exec(s.body, new_scope(scope), text) != Flow::Normal) fail("'break' or 'continue' outside a loop");
      Value v(Json(std::move(text)));
      for (auto& f : s.filters) v = apply_filter(*f, v, scope);
      if (s.k == Stmt::K::SetBlock) scope->vars[s.targets[0]] = v;
      else out += to_str(v);
      return Flow::Normal;
    }
    case Stmt::K::Macro: {
      const Stmt* def = &s;
      Scope* closure = scope;  // macros see the variables where they were defined, at call time
      scope->vars[s.text] = make_callable(s.text, [def, closure](Renderer& r, CallArgs& a) {
        DepthGuard guard(r.depth);
        const std::string& name = def->text;
        if (a.positional.size() > def->params.size())
          fail("macro '" + name + "' takes not more than " + std::to_string(def->params.size()) + " argument(s)");
        Scope* local = r.new_scope(closure);
        std::vector<bool> bound(def->params.size(), false);
        for (size_t i = 0; i < a.positional.size(); ++i) {
          local->vars[def->params[i].name] = a.positional[i];
          bound[i] = true;
        }
        for (auto& [k, v] : a.keyword) {
          size_t i = 0;
          while (i < def->params.size() && def->params[i].name != k) ++i;
          if (i == def->params.size()) fail("macro '" + name + "' takes no keyword argument '" + k + "'");
          if (bound[i]) fail("macro '" + name + "' got multiple values for argument '" + k + "'");
          local->vars[k] = v;
          bound[i] = true;
        }
        for (size_t i = 0; i < def->params.size(); ++i) {
          if (bound[i]) continue;
          const MacroParam& p = def->params[i];
          local->vars[p.name] = p.default_value ? r.eval(*p.default_value, local)
                                                : Value::undefined("parameter '" + p.name + "' was not provided");
        }
        std::string text;
        if (r.exec(def->body, local, text) != Flow::Normal) fail("'break' or 'continue' outside a loop");
        return Value(Json(std::move(text)));
      });
      return Flow::Normal;
    }
    case Stmt::K::Break: return Flow::Break;
    case Stmt::K::Continue: return Flow::Continue;
    case Stmt::K::Scope: return exec(s.body, scope, out);
  }
  return Flow::Normal;
}

std::string Renderer::strftime_now(const std::string& format) const {
  std::tm tm{};
  if (fixed_time_) {
    tm = *fixed_time_;
  } else {
    std::time_t now = std::time(nullptr);
    localtime_r(&now, &tm);
  }
  if (format.empty()) return "";
  for (size_t size = 256; size <= (size_t{1} << 20); size *= 4) {
    std::string buf(size, '\0');
    size_t n = std::strftime(buf.data(), buf.size(), format.c_str(), &tm);
    if (n > 0) return buf.substr(0, n);
  }
  return "";  // every conversion produced nothing (e.g. "%p" in some locales)
}

// jinja2's default globals plus transformers' raise_exception and strftime_now.
void add_globals(Scope* g) {
  g->vars["raise_exception"] = make_callable("raise_exception", [](Renderer&, CallArgs& a) -> Value {
    // transformers raises TemplateError(message); the message is passed on unchanged.
    const Value* m = get_arg(a, 0, "message");
    throw Error(m ? to_str(*m) : std::string());
  });
  g->vars["strftime_now"] = make_callable("strftime_now", [](Renderer& r, CallArgs& a) {
    check_args(a, "strftime_now", {"format"});
    return Value(Json(r.strftime_now(str_arg(a, 0, "format"))));
  });
  g->vars["namespace"] = make_callable("namespace", [](Renderer&, CallArgs& a) {
    auto obj = std::make_shared<Object>();
    obj->is_namespace = true;
    for (const Value& p : a.positional) {
      if (!p.is_data() || !p.data.is_object()) fail("namespace() takes mappings or keyword arguments");
      for (auto it = p.data.begin(); it != p.data.end(); ++it) obj->set(it.key(), Value(it.value()));
    }
    for (auto& [k, v] : a.keyword) obj->set(k, v);
    Value v;
    v.kind = Value::Kind::Object;
    v.object = std::move(obj);
    return v;
  });
  g->vars["range"] = make_callable("range", [](Renderer&, CallArgs& a) {
    if (!a.keyword.empty() || a.positional.empty() || a.positional.size() > 3) fail("range() takes 1 to 3 integers");
    std::vector<int64_t> n;
    for (const Value& v : a.positional) {
      if (!v.is_data() || !is_intlike(v.data)) fail("range() arguments must be integers, not " + type_name(v));
      n.push_back(as_int(v.data));
    }
    int64_t start = n.size() > 1 ? n[0] : 0, stop = n.size() > 1 ? n[1] : n[0], step = n.size() > 2 ? n[2] : 1;
    if (step == 0) fail("range() arg 3 must not be zero");
    Json arr = Json::array();
    for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
      if (static_cast<int64_t>(arr.size()) >= kMaxRange)
        fail("range too big, maximum size for range is " + std::to_string(kMaxRange));
      arr.push_back(i);
    }
    return Value(std::move(arr));
  });
  g->vars["dict"] = make_callable("dict", [](Renderer&, CallArgs& a) {
    Json obj = Json::object();
    for (const Value& p : a.positional) {
      if (!p.is_data() || !p.data.is_object()) fail("dict() takes a mapping or keyword arguments");
      for (auto it = p.data.begin(); it != p.data.end(); ++it) obj[it.key()] = it.value();
    }
    for (auto& [k, v] : a.keyword) obj[k] = to_json(v);
    return Value(std::move(obj));
  });
}

std::string Renderer::run(const Body& body, const Json& context) {
  Scope* globals = new_scope(nullptr);
  add_globals(globals);
  Scope* root = new_scope(globals);  // render variables shadow globals; top-level `set` writes here
  for (auto it = context.begin(); it != context.end(); ++it) root->vars[it.key()] = Value(it.value());
  std::string out;
  try {
    if (exec(body, root, out) != Flow::Normal) fail("'break' or 'continue' outside a loop");
  } catch (const Failure& failure) {
    throw Error("chat template error: " + failure.message);
  }
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------------------------------

struct ChatTemplate::Program {
  Body body;
};

ChatTemplate::ChatTemplate(std::string source) : source_(std::move(source)) {
  auto program = std::make_shared<Program>();
  try {
    program->body = Parser(Lexer(source_).run()).parse_template();
  } catch (const Failure& failure) {  // e.g. a bad literal found while lexing
    throw Error("chat template syntax error: " + failure.message);
  }
  program_ = std::move(program);
}

ChatTemplate::~ChatTemplate() = default;
ChatTemplate::ChatTemplate(const ChatTemplate&) = default;
ChatTemplate& ChatTemplate::operator=(const ChatTemplate&) = default;
ChatTemplate::ChatTemplate(ChatTemplate&&) noexcept = default;
ChatTemplate& ChatTemplate::operator=(ChatTemplate&&) noexcept = default;

std::string ChatTemplate::render(const nlohmann::ordered_json& context) const {
  check(context.is_object(), "chat template context must be a JSON object");
  Renderer renderer(fixed_time_);
  return renderer.run(program_->body, context);
}

std::string ChatTemplate::render(const std::vector<ChatMessage>& messages, bool add_generation_prompt,
                                 const std::string& bos_token, const std::string& eos_token,
                                 const nlohmann::ordered_json& extra) const {
  check(extra.is_object(), "chat template extra variables must be a JSON object");
  Json context = Json::object();
  Json list = Json::array();
  for (const ChatMessage& m : messages) list.push_back(Json{{"role", m.role}, {"content", m.content}});
  context["messages"] = std::move(list);
  context["tools"] = nullptr;  // transformers always passes these two, as None when not given
  context["documents"] = nullptr;
  context["add_generation_prompt"] = add_generation_prompt;
  context["bos_token"] = bos_token;
  context["eos_token"] = eos_token;
  for (auto it = extra.begin(); it != extra.end(); ++it) context[it.key()] = it.value();
  return render(context);
}

}  // namespace bioquant
