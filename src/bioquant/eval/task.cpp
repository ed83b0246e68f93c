#include "bioquant/eval/task.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <mutex>
#include <set>

#include <nlohmann/json.hpp>

#include "bioquant/core/closest_name.h"
#include "bioquant/core/error.h"
#include "bioquant/core/mapped_file.h"
#include "bioquant/io/json_lines.h"

namespace bioquant::eval {

namespace fs = std::filesystem;
using nlohmann::json;

// Defined in the generated builtin_tasks.cpp (CMake embeds tasks/*.json).
extern const std::vector<std::pair<const char*, const char*>>& builtin_task_texts();

namespace {

// The study's order, used for "all" and in reports.
const std::vector<std::string> kStudyOrder = {"bc5cdr-chem", "ncbi-disease", "chemprot", "ddi2013",
                                              "hoc",         "litcovid",     "medqa",    "pubmedqa"};

std::string get_string(const json& j, const char* key, const std::string& source, bool required,
                       const std::string& fallback = "") {
  auto it = j.find(key);
  if (it == j.end()) {
    check(!required, "task description " + source + ": missing \"" + key + "\"");
    return fallback;
  }
  check(it->is_string(), "task description " + source + ": \"" + key + "\" must be a string");
  return it->get<std::string>();
}

std::vector<TaskSpec>& registry() {
  static std::vector<TaskSpec> tasks = [] {
    std::vector<TaskSpec> out;
    for (const auto& [file, text] : builtin_task_texts()) {
      json j;
      try {
        j = json::parse(text);
      } catch (const json::exception& e) {
        throw Error(std::string("built-in task ") + file + ": " + e.what());
      }
      out.push_back(parse_task_spec(j, "builtin"));
    }
    auto rank = [](const std::string& name) {
      auto it = std::find(kStudyOrder.begin(), kStudyOrder.end(), name);
      return static_cast<size_t>(it - kStudyOrder.begin());
    };
    std::stable_sort(out.begin(), out.end(),
                     [&](const TaskSpec& a, const TaskSpec& b) { return rank(a.name) < rank(b.name); });
    return out;
  }();
  return tasks;
}

// One TSV record per call, honouring CSV quoting (a field that starts with '"' runs to the closing
// quote, "" is a literal quote, tabs and newlines inside are data) as Python's csv module does.
class TsvReader {
 public:
  TsvReader(std::string_view data, std::string path) : data_(data), path_(std::move(path)) {}

  bool next(std::vector<std::string>& fields) {
    fields.clear();
    if (pos_ >= data_.size()) return false;
    ++line_;
    record_line_ = line_;
    std::string field;
    bool quoted = false, was_quoted = false, at_field_start = true;
    while (pos_ < data_.size()) {
      const char c = data_[pos_++];
      if (quoted) {
        if (c == '"') {
          if (pos_ < data_.size() && data_[pos_] == '"') {
            field += '"';
            ++pos_;
          } else {
            quoted = false;
          }
        } else {
          if (c == '\n') ++line_;
          field += c;
        }
        continue;
      }
      if (c == '"' && at_field_start) {
        quoted = was_quoted = true;
        at_field_start = false;
        continue;
      }
      if (c == '\t') {
        fields.push_back(std::move(field));
        field.clear();
        at_field_start = true;
        was_quoted = false;
        continue;
      }
      if (c == '\n' || c == '\r') {
        if (c == '\r' && pos_ < data_.size() && data_[pos_] == '\n') ++pos_;
        break;
      }
      at_field_start = false;
      field += c;
    }
    check(!quoted, path_ + ":" + std::to_string(record_line_) + ": unterminated quoted field");
    (void)was_quoted;
    fields.push_back(std::move(field));
    return true;
  }
  size_t record_line() const { return record_line_; }

 private:
  std::string_view data_;
  std::string path_;
  size_t pos_ = 0, line_ = 0, record_line_ = 0;
};

std::string trim(std::string_view s) {
  size_t b = 0, e = s.size();
  while (b < e && (s[b] == ' ' || s[b] == '\t' || s[b] == '\r' || s[b] == '\n')) ++b;
  while (e > b && (s[e - 1] == ' ' || s[e - 1] == '\t' || s[e - 1] == '\r' || s[e - 1] == '\n')) --e;
  return std::string(s.substr(b, e - b));
}

std::string join(const std::vector<std::string>& parts, const std::string& sep) {
  std::string out;
  for (size_t i = 0; i < parts.size(); ++i) {
    if (i) out.append(sep);
    out.append(parts[i]);
  }
  return out;
}

// Ids must be unique within a split (score matches outputs by id). A file whose own id repeats
// (ChemProt dev has 4 index values used twice, with different labels) gets "#2", "#3", ... on the
// later occurrences, so every row stays addressable and the first keeps the file's id.
void make_ids_unique(std::vector<Example>& examples) {
  std::map<std::string, int> seen;
  for (auto& ex : examples) {
    const int n = ++seen[ex.id];
    if (n > 1) ex.id.append("#").append(std::to_string(n));
  }
}

std::vector<Example> read_conll(const std::string& path, std::string_view data) {
  std::vector<Example> out;
  Example current;
  std::vector<std::string> tags;
  size_t line_no = 0;
  auto flush = [&] {
    if (current.tokens.empty()) return;
    current.id = std::to_string(out.size());
    current.text = join(current.tokens, " ");
    current.gold.spans = spans_from_bio(tags);
    out.push_back(std::move(current));
    current = Example{};
    tags.clear();
  };
  size_t pos = 0;
  while (pos <= data.size()) {
    size_t end = data.find('\n', pos);
    if (end == std::string_view::npos) end = data.size();
    std::string_view line = data.substr(pos, end - pos);
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (trim(line).empty()) {
      flush();
    } else {
      const size_t tab = line.rfind('\t');
      check(tab != std::string_view::npos && tab > 0,
            path + ":" + std::to_string(line_no) + ": expected token<TAB>tag");
      std::string tag = trim(line.substr(tab + 1));
      const std::string base = tag.substr(0, tag.find('-'));  // "B-Chemical" -> "B"
      check(base == "B" || base == "I" || base == "O",
            path + ":" + std::to_string(line_no) + ": tag \"" + tag + "\" is not B, I or O");
      current.tokens.emplace_back(line.substr(0, tab));
      tags.push_back(base);
    }
    if (end == data.size()) break;
    pos = end + 1;
  }
  flush();
  return out;
}

std::string canonical_label(const TaskSpec& task, const std::string& raw, const std::string& where) {
  const std::string label = trim(raw);
  for (const auto& l : task.labels)
    if (l == label) return l;
  for (const auto& l : task.labels) {  // labels in the files differ in case at most
    if (l.size() == label.size() &&
        std::equal(l.begin(), l.end(), label.begin(), [](char a, char b) { return std::tolower(a) == std::tolower(b); }))
      return l;
  }
  throw Error(where + ": label \"" + label + "\" is not in the label set of " + task.name);
}

std::vector<Example> read_tsv(const TaskSpec& task, const std::string& path, std::string_view data) {
  TsvReader reader(data, path);
  std::vector<std::string> header, fields;
  check(reader.next(header), path + ": empty file (expected a header line)");
  std::map<std::string, size_t> index;
  for (const auto& [field, column] : task.columns) {
    auto it = std::find(header.begin(), header.end(), column);
    check(it != header.end(), path + ": no column \"" + column + "\" in the header");
    index[field] = static_cast<size_t>(it - header.begin());
  }
  std::vector<Example> out;
  while (reader.next(fields)) {
    if (fields.size() == 1 && trim(fields[0]).empty()) continue;  // blank line
    const std::string where = path + ":" + std::to_string(reader.record_line());
    check(fields.size() == header.size(), where + ": " + std::to_string(fields.size()) + " fields, header has " +
                                              std::to_string(header.size()));
    Example ex;
    ex.id = index.count("id") ? trim(fields[index["id"]]) : std::to_string(out.size());
    check(!ex.id.empty(), where + ": empty id");
    if (index.count("text")) ex.text = trim(fields[index["text"]]);
    if (index.count("context")) {
      ex.context_raw = fields[index["context"]];
      try {
        ex.context = join(parse_python_string_list(ex.context_raw), " ");
      } catch (const Error& e) {
        throw Error(where + ": context: " + e.what());
      }
    }
    if (index.count("label")) ex.gold.labels.push_back(canonical_label(task, fields[index["label"]], where));
    if (index.count("labels")) {
      std::set<std::string> chosen;
      std::string_view rest = fields[index["labels"]];
      while (!rest.empty()) {
        const size_t sep = rest.find(task.label_separator);
        const std::string part = trim(rest.substr(0, sep));
        if (!part.empty()) chosen.insert(canonical_label(task, part, where));
        if (sep == std::string_view::npos) break;
        rest.remove_prefix(sep + task.label_separator.size());
      }
      for (const auto& l : task.labels)  // label-set order
        if (chosen.count(l)) ex.gold.labels.push_back(l);
    }
    out.push_back(std::move(ex));
  }
  return out;
}

std::vector<Example> read_mcq_jsonl(const TaskSpec& task, const std::string& path, std::string_view data) {
  std::vector<Example> out;
  constexpr const char* kExpected = "{question, options: {A: ...}, answer_idx}";
  io::for_each_json_line(
      data, path,
      [&](json& j, const std::string& where) {
        check(j.is_object() && j.contains("question") && j["question"].is_string() && j.contains("options") &&
                  j["options"].is_object() && j.contains("answer_idx") && j["answer_idx"].is_string(),
              where + ": expected " + kExpected);
        Example ex;
        ex.text = trim(j["question"].get<std::string>());
        for (const auto& [letter, text] : j["options"].items()) {
          check(text.is_string(), where + ": option " + letter + " is not a string");
          ex.option_letters.push_back(letter);
          ex.option_texts.push_back(trim(text.get<std::string>()));
        }
        const std::string answer = j["answer_idx"].get<std::string>();
        check(std::find(ex.option_letters.begin(), ex.option_letters.end(), answer) != ex.option_letters.end(),
              where + ": answer_idx \"" + answer + "\" is not one of the options");
        ex.gold.labels = {answer};
        out.push_back(std::move(ex));
      },
      kExpected);
  (void)task;
  // Ids are line positions among non-empty lines: a trailing blank line changes nothing.
  for (size_t i = 0; i < out.size(); ++i) out[i].id = std::to_string(i);
  return out;
}

}  // namespace

const char* family_name(TaskFamily family) {
  switch (family) {
    case TaskFamily::ner: return "ner";
    case TaskFamily::relation: return "relation";
    case TaskFamily::multilabel: return "multilabel";
    case TaskFamily::qa: return "qa";
  }
  return "?";
}

TaskFamily parse_family(const std::string& name) {
  for (TaskFamily f : {TaskFamily::ner, TaskFamily::relation, TaskFamily::multilabel, TaskFamily::qa})
    if (name == family_name(f)) return f;
  throw Error("unknown task family \"" + name + "\" (expected ner, relation, multilabel or qa)");
}

const SplitSpec& TaskSpec::split(const std::string& split_name) const {
  for (const auto& s : splits)
    if (s.name == split_name) return s;
  std::vector<std::string> names;
  for (const auto& s : splits) names.push_back(s.name);
  throw Error("task " + name + " has no split \"" + split_name + "\" (splits: " + join(names, ", ") + ")");
}

std::string TaskSpec::column(const std::string& field) const {
  for (const auto& [f, c] : columns)
    if (f == field) return c;
  return "";
}

TaskSpec parse_task_spec(const json& j, const std::string& source) {
  check(j.is_object(), "task description " + source + ": expected a JSON object");
  TaskSpec t;
  t.source = source;
  t.name = get_string(j, "name", source, true);
  check(!t.name.empty() && t.name.find_first_of(" ,/") == std::string::npos,
        "task description " + source + ": \"name\" must be a non-empty word without spaces, commas or slashes");
  const std::string where = "task " + t.name + " (" + source + ")";
  t.family = parse_family(get_string(j, "family", source, true));
  t.dataset = get_string(j, "dataset", source, false, t.name);
  t.data_dir = get_string(j, "data_dir", source, true);
  t.reader = get_string(j, "reader", source, true);
  check(t.reader == "conll" || t.reader == "tsv" || t.reader == "mcq_jsonl",
        where + ": reader \"" + t.reader + "\" is not conll, tsv or mcq_jsonl");
  if (j.contains("columns")) {
    check(j["columns"].is_object(), where + ": \"columns\" must be an object");
    for (const auto& [field, column] : j["columns"].items()) {
      static const std::set<std::string> known = {"id", "text", "label", "labels", "context"};
      check(known.count(field), where + ": unknown column field \"" + field + "\" (id, text, label, labels, context)");
      check(column.is_string(), where + ": column \"" + field + "\" must name a header");
      t.columns.emplace_back(field, column.get<std::string>());
    }
  }
  t.label_separator = get_string(j, "label_separator", source, false, ";");
  check(!t.label_separator.empty(), where + ": empty label_separator");
  const std::string default_fewshot = get_string(j, "fewshot_split", source, false);
  check(j.contains("splits") && j["splits"].is_object() && !j["splits"].empty(),
        where + ": \"splits\" must be a non-empty object of split name -> file");
  for (const auto& [name, value] : j["splits"].items()) {
    SplitSpec s;
    s.name = name;
    if (value.is_string()) {
      s.file = value.get<std::string>();
      s.fewshot = default_fewshot;
    } else {
      check(value.is_object() && value.contains("file") && value["file"].is_string(),
            where + ": split \"" + name + "\" must be a file name or {\"file\": ..., \"fewshot\": ...}");
      s.file = value["file"].get<std::string>();
      s.fewshot = value.value("fewshot", default_fewshot);
    }
    t.splits.push_back(std::move(s));
  }
  for (const auto& s : t.splits)
    check(s.fewshot.empty() || std::any_of(t.splits.begin(), t.splits.end(),
                                           [&](const SplitSpec& o) { return o.name == s.fewshot; }),
          where + ": few-shot split \"" + s.fewshot + "\" of split \"" + s.name + "\" is not a split");
  t.default_split = get_string(j, "default_split", source, false, t.splits.front().name);
  t.split(t.default_split);  // validates
  t.metric = get_string(j, "metric", source, true);
  if (j.contains("labels")) {
    check(j["labels"].is_array(), where + ": \"labels\" must be an array of strings");
    for (const auto& l : j["labels"]) {
      check(l.is_string() && !l.get<std::string>().empty(), where + ": \"labels\" must be an array of strings");
      t.labels.push_back(l.get<std::string>());
    }
  }
  if (j.contains("aliases")) {
    check(j["aliases"].is_object(), where + ": \"aliases\" must be an object of phrase -> label");
    for (const auto& [phrase, label] : j["aliases"].items()) {
      check(label.is_string() && std::find(t.labels.begin(), t.labels.end(), label.get<std::string>()) != t.labels.end(),
            where + ": alias \"" + phrase + "\" must map to a label of the label set");
      t.aliases.emplace_back(phrase, label.get<std::string>());
    }
  }
  t.entity_class = get_string(j, "entity_class", source, false, "entity");
  if (j.contains("max_new_tokens")) {
    check(j["max_new_tokens"].is_number_integer() && j["max_new_tokens"].get<int>() > 0 &&
              j["max_new_tokens"].get<int>() <= 8192,
          where + ": \"max_new_tokens\" must be an integer in 1..8192");
    t.max_new_tokens = j["max_new_tokens"].get<int>();
  }
  t.instruction = get_string(j, "instruction", source, true);
  t.input_template = get_string(j, "input_template", source, false, "{text}");
  t.output_prefix = get_string(j, "output_prefix", source, false, "Answer:");
  t.chen2023_input_template = get_string(j, "chen2023_input_template", source, false);

  // Family-specific consistency, so a bad description fails at load, not mid-run.
  switch (t.family) {
    case TaskFamily::ner:
      check(t.reader == "conll", where + ": ner tasks use the conll reader");
      break;
    case TaskFamily::relation:
      check(t.reader == "tsv" && !t.column("label").empty(), where + ": relation tasks need a tsv \"label\" column");
      check(t.labels.size() >= 2, where + ": relation tasks need at least 2 labels");
      break;
    case TaskFamily::multilabel:
      check(t.reader == "tsv" && !t.column("labels").empty(), where + ": multilabel tasks need a tsv \"labels\" column");
      check(t.labels.size() >= 1, where + ": multilabel tasks need a label set");
      break;
    case TaskFamily::qa:
      check(t.reader == "mcq_jsonl" || (!t.column("label").empty() && !t.labels.empty()),
            where + ": qa tasks are multiple choice (mcq_jsonl) or a tsv \"label\" column with a label set");
      break;
  }
  if (t.reader == "tsv") check(!t.column("text").empty(), where + ": the tsv reader needs a \"text\" column");
  return t;
}

TaskSpec load_task_file(const std::string& path) {
  const std::string text = read_text_file(path);
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    throw Error("task description " + path + ": malformed JSON (" + std::string(e.what()) + ")");
  }
  return parse_task_spec(j, path);
}

const std::vector<TaskSpec>& all_tasks() { return registry(); }

void register_task(TaskSpec spec) {
  auto& tasks = registry();
  for (auto& t : tasks)
    if (t.name == spec.name) {
      t = std::move(spec);
      return;
    }
  tasks.push_back(std::move(spec));
}

const TaskSpec& find_task(const std::string& name) {
  for (const auto& t : all_tasks())
    if (t.name == name) return t;
  std::vector<std::string> names;
  for (const auto& t : all_tasks()) names.push_back(t.name);
  const std::string best = closest_name(name, names);
  throw Error("unknown task \"" + name + "\"" + (best.empty() ? "" : " (did you mean " + best + "?)") +
              "; tasks: " + join(names, ", "));
}

std::vector<const TaskSpec*> select_tasks(const std::string& list) {
  std::vector<const TaskSpec*> out;
  if (trim(list) == "all") {
    for (const auto& t : all_tasks()) out.push_back(&t);
    return out;
  }
  std::string_view rest = list;
  while (true) {
    const size_t comma = rest.find(',');
    const std::string name = trim(rest.substr(0, comma));
    check(!name.empty(), "empty task name in \"" + list + "\"");
    const TaskSpec* t = &find_task(name);
    if (std::find(out.begin(), out.end(), t) == out.end()) out.push_back(t);
    if (comma == std::string_view::npos) break;
    rest.remove_prefix(comma + 1);
  }
  return out;
}

std::string resolve_data_dir(const std::optional<std::string>& explicit_dir, const TaskSpec& task) {
  auto holds = [&](const std::string& dir) { return !dir.empty() && fs::is_directory(fs::path(dir) / task.data_dir); };
  if (explicit_dir) {
    check(holds(*explicit_dir),
          "--data-dir " + *explicit_dir + " has no " + task.data_dir + "/ directory for task " + task.name);
    return *explicit_dir;
  }
  const char* env = std::getenv("BIOQUANT_DATA");
  if (env && *env) {
    check(holds(env), "$BIOQUANT_DATA=" + std::string(env) + " has no " + task.data_dir + "/ directory for task " +
                          task.name);
    return env;
  }
  if (holds("../shared/bionlp")) return "../shared/bionlp";
  throw Error("no data for task " + task.name + ": pass --data-dir DIR, set $BIOQUANT_DATA, or run beside ../shared/bionlp (each must hold " +
              task.data_dir + "/)");
}

std::vector<Example> read_split(const TaskSpec& task, const std::string& data_dir, const std::string& split_name) {
  const SplitSpec& split = task.split(split_name);
  const std::string path = (fs::path(data_dir) / task.data_dir / split.file).string();
  check(fs::is_regular_file(path), "task " + task.name + " split " + split_name + ": no file " + path);
  const std::string data = read_text_file(path);
  std::vector<Example> out;
  if (task.reader == "conll") out = read_conll(path, data);
  else if (task.reader == "tsv") out = read_tsv(task, path, data);
  else out = read_mcq_jsonl(task, path, data);
  check(!out.empty(), path + ": no examples");
  make_ids_unique(out);
  return out;
}

std::vector<std::string> evaluated_splits(const TaskSpec& task) {
  std::vector<std::string> out;
  // Test splits count when the default evaluation is a test split (MedQA: test and test_5options
  // hold the same questions); where the default is sample200, the other test rows are not evaluated
  // (LitCovid draws few-shot examples from them).
  const bool test_default = task.default_split.rfind("test", 0) == 0;
  for (const auto& s : task.splits)
    if (s.name == task.default_split || s.name == "sample200" || (test_default && s.name.rfind("test", 0) == 0))
      out.push_back(s.name);
  return out;
}

std::string example_key(const Example& ex) {
  std::string key;
  bool space = false;
  for (char c : ex.text) {
    if (std::isspace(static_cast<unsigned char>(c))) {
      space = !key.empty();
      continue;
    }
    if (space) key += ' ';
    space = false;
    key += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  }
  return key;
}

std::vector<std::string> parse_python_string_list(const std::string& text) {
  std::vector<std::string> out;
  size_t i = 0;
  auto skip_space = [&] {
    while (i < text.size() && std::isspace(static_cast<unsigned char>(text[i]))) ++i;
  };
  skip_space();
  check(i < text.size() && text[i] == '[', "expected a list of strings starting with [");
  ++i;
  skip_space();
  if (i < text.size() && text[i] == ']') return out;
  while (true) {
    skip_space();
    check(i < text.size() && (text[i] == '\'' || text[i] == '"'), "expected a quoted string in the list");
    const char quote = text[i++];
    std::string s;
    while (true) {
      check(i < text.size(), "unterminated string in the list");
      const char c = text[i++];
      if (c == quote) break;
      if (c != '\\') {
        s += c;
        continue;
      }
      check(i < text.size(), "unterminated escape in the list");
      const char e = text[i++];
      switch (e) {
        case 'n': s += '\n'; break;
        case 't': s += '\t'; break;
        case 'r': s += '\r'; break;
        case '\\': s += '\\'; break;
        case '\'': s += '\''; break;
        case '"': s += '"'; break;
        case 'x': case 'u': case 'U': {
          const int digits = e == 'x' ? 2 : e == 'u' ? 4 : 8;
          check(i + digits <= text.size(), "short \\" + std::string(1, e) + " escape in the list");
          const uint32_t cp = static_cast<uint32_t>(std::stoul(text.substr(i, digits), nullptr, 16));
          i += digits;
          // UTF-8 encode.
          if (cp < 0x80) s += static_cast<char>(cp);
          else if (cp < 0x800) { s += static_cast<char>(0xC0 | (cp >> 6)); s += static_cast<char>(0x80 | (cp & 0x3F)); }
          else if (cp < 0x10000) { s += static_cast<char>(0xE0 | (cp >> 12)); s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F)); s += static_cast<char>(0x80 | (cp & 0x3F)); }
          else { s += static_cast<char>(0xF0 | (cp >> 18)); s += static_cast<char>(0x80 | ((cp >> 12) & 0x3F)); s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F)); s += static_cast<char>(0x80 | (cp & 0x3F)); }
          break;
        }
        default: s += '\\'; s += e;
      }
    }
    out.push_back(std::move(s));
    skip_space();
    check(i < text.size(), "unterminated list");
    if (text[i] == ',') {
      ++i;
      skip_space();
      if (i < text.size() && text[i] == ']') break;
      continue;
    }
    check(text[i] == ']', "expected , or ] in the list");
    break;
  }
  return out;
}

std::vector<Span> spans_from_bio(const std::vector<std::string>& tags) {
  std::vector<Span> spans;
  int32_t start = -1;
  for (int32_t i = 0; i <= static_cast<int32_t>(tags.size()); ++i) {
    const std::string tag = i < static_cast<int32_t>(tags.size()) ? tags[static_cast<size_t>(i)].substr(0, 1) : "O";
    if (tag == "B" || tag == "O" || (tag == "I" && start < 0)) {
      if (start >= 0) spans.push_back({start, i});
      start = (tag == "O") ? -1 : i;
    }
  }
  return spans;
}

}  // namespace bioquant::eval
