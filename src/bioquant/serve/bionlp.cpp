#include "bioquant/serve/bionlp.h"

#include <algorithm>
#include <set>

#include <utf8proc.h>

#include "bioquant/core/error.h"
#include "bioquant/eval/parsers.h"
#include "bioquant/eval/scoring.h"
#include "bioquant/tokenizer/unicode.h"

namespace bioquant::serve {

using nlohmann::json;
using eval::TaskFamily;
using eval::TaskSpec;

const char* endpoint_path(TaskEndpoint e) {
  switch (e) {
    case TaskEndpoint::ner: return "/v1/bionlp/ner";
    case TaskEndpoint::relation: return "/v1/bionlp/relation";
    case TaskEndpoint::classify: return "/v1/bionlp/classify";
    case TaskEndpoint::qa: return "/v1/bionlp/qa";
  }
  return "?";
}

namespace {

enum class CharKind { space, word, other };

CharKind kind_of(uint32_t cp) {
  if (cp < 0x80) {
    if (cp == ' ' || (cp >= '\t' && cp <= '\r')) return CharKind::space;
    const bool alnum = (cp >= '0' && cp <= '9') || (cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z');
    return alnum ? CharKind::word : CharKind::other;
  }
  switch (utf8proc_category(static_cast<utf8proc_int32_t>(cp))) {
    case UTF8PROC_CATEGORY_ZS:
    case UTF8PROC_CATEGORY_ZL:
    case UTF8PROC_CATEGORY_ZP: return CharKind::space;
    case UTF8PROC_CATEGORY_LU:
    case UTF8PROC_CATEGORY_LL:
    case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM:
    case UTF8PROC_CATEGORY_LO:
    case UTF8PROC_CATEGORY_MN:
    case UTF8PROC_CATEGORY_MC:
    case UTF8PROC_CATEGORY_ME:
    case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_NL:
    case UTF8PROC_CATEGORY_NO: return CharKind::word;
    default: return CharKind::other;
  }
}

}  // namespace

std::vector<TextToken> split_dataset_tokens(std::string_view text) {
  std::vector<TextToken> out;
  size_t i = 0, chars = 0;
  bool in_word = false;
  while (i < text.size()) {
    const size_t begin = i;
    const uint32_t cp = unicode::next_code_point(text, i);
    const CharKind k = kind_of(cp);
    if (k == CharKind::word && in_word) {
      out.back().text.append(text.substr(begin, i - begin));
      out.back().byte_end = i;
      out.back().char_end = chars + 1;
    } else if (k != CharKind::space) {
      out.push_back({std::string(text.substr(begin, i - begin)), begin, i, chars, chars + 1});
    }
    in_word = k == CharKind::word;
    ++chars;
  }
  return out;
}

namespace {

constexpr size_t kMaxText = size_t(1) << 20;  // the body cap bounds it first

// The task a request names, of the endpoint's family.
const TaskSpec& named_task(const std::string& name, TaskFamily family, TaskEndpoint endpoint) {
  const TaskSpec* task = nullptr;
  try {
    task = &eval::find_task(name);
  } catch (const Error& e) {
    throw bad_request(e.what(), "task");
  }
  if (task->family != family) {
    TaskEndpoint right = TaskEndpoint::ner;
    switch (task->family) {
      case TaskFamily::ner: right = TaskEndpoint::ner; break;
      case TaskFamily::relation: right = TaskEndpoint::relation; break;
      case TaskFamily::multilabel: right = TaskEndpoint::classify; break;
      case TaskFamily::qa: right = TaskEndpoint::qa; break;
    }
    throw bad_request("task \"" + name + "\" is a " + eval::family_name(task->family) + " task: use " +
                          endpoint_path(right) + ", not " + endpoint_path(endpoint),
                      "task");
  }
  return *task;
}

// The argument markers a relation task's instruction names (@CHEMICAL$, @GENE$, @DRUG$).
std::vector<std::string> argument_markers(const TaskSpec& task) {
  std::vector<std::string> out;
  const std::string& s = task.instruction;
  for (size_t at = s.find('@'); at != std::string::npos; at = s.find('@', at + 1)) {
    size_t end = at + 1;
    while (end < s.size() && ((s[end] >= 'A' && s[end] <= 'Z') || s[end] == '_')) ++end;
    if (end > at + 1 && end < s.size() && s[end] == '$') {
      const std::string marker = s.substr(at, end - at + 1);
      if (std::find(out.begin(), out.end(), marker) == out.end()) out.push_back(marker);
    }
  }
  return out;
}

// A multi-label task over a request's own labels, worded like the built-in ones.
TaskSpec custom_label_task(const std::vector<std::string>& labels,
                           const std::function<int64_t(const std::string&)>& count_tokens) {
  TaskSpec t;
  t.name = "custom";
  t.family = TaskFamily::multilabel;
  t.dataset = "request";
  t.metric = "label_macro_f1";
  t.labels = labels;
  std::string list;
  for (size_t i = 0; i < labels.size(); ++i) list += (i ? "; " : "") + labels[i];
  t.instruction =
      "TASK: decide which of the given labels apply to the text.\nINPUT: a text.\nOUTPUT: a JSON object with each "
      "label as a key and 1 (applies) or 0 (does not apply) as its value; several labels can apply. The labels: " +
      list + ".";
  t.input_template = "Text: {text}";
  t.output_prefix = "Output:";
  // Room for the whole JSON object with every label, and a little more.
  const int64_t budget = count_tokens(eval::render_multilabel_json(labels, labels)) + 16;
  t.max_new_tokens = static_cast<int>(std::min<int64_t>(budget, 2048));
  t.source = "request";
  return t;
}

std::string join_tokens(const std::vector<TextToken>& tokens) {
  std::string out;
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (i) out += ' ';
    out += tokens[i].text;
  }
  return out;
}

}  // namespace

TaskQuery parse_task_request(TaskEndpoint endpoint, const json& body, bool chat,
                             const std::function<int64_t(const std::string&)>& count_tokens) {
  TaskQuery q;
  q.endpoint = endpoint;
  ObjectReader r(body, "request body");
  switch (endpoint) {
    case TaskEndpoint::ner: {
      q.text = r.string("text", kMaxText, true).value();
      q.task = named_task(r.string("task", 64, true).value(), TaskFamily::ner, endpoint);
      q.tokens = split_dataset_tokens(q.text);
      if (q.tokens.empty()) throw bad_request("\"text\" has no words", "text");
      for (const auto& t : q.tokens) q.example.tokens.push_back(t.text);
      q.example.text = join_tokens(q.tokens);
      break;
    }
    case TaskEndpoint::relation: {
      q.example.text = r.string("text", kMaxText, true).value();
      q.task = named_task(r.string("task", 64, true).value(), TaskFamily::relation, endpoint);
      for (const std::string& marker : argument_markers(q.task)) {
        if (q.example.text.find(marker) == std::string::npos)
          throw bad_request("\"text\" must mark the arguments as the " + q.task.name + " dataset does: " + marker +
                                " is missing",
                            "text");
      }
      break;
    }
    case TaskEndpoint::classify: {
      q.example.text = r.string("text", kMaxText, true).value();
      const auto name = r.string("task", 64);
      const json* labels = r.get("labels");
      if (name.has_value() == (labels != nullptr))
        throw bad_request("give either \"task\" (hoc, litcovid, ...) or \"labels\" (your own label set)",
                          name ? "labels" : "task");
      if (name) {
        q.task = named_task(*name, TaskFamily::multilabel, endpoint);
      } else {
        if (!labels->is_array() || labels->empty() || labels->size() > 64)
          throw bad_request("\"labels\" must be an array of 1 to 64 strings", "labels");
        std::vector<std::string> set;
        std::set<std::string> seen;
        for (const json& l : *labels) {
          if (!l.is_string() || l.get_ref<const std::string&>().empty() || l.get_ref<const std::string&>().size() > 200)
            throw bad_request("each label must be a non-empty string of at most 200 bytes", "labels");
          const std::string& s = l.get_ref<const std::string&>();
          if (s.find_first_of("\n\r") != std::string::npos) throw bad_request("labels must be one line each", "labels");
          if (!seen.insert(unicode::lowercase(s)).second) throw bad_request("label \"" + s + "\" appears twice", "labels");
          set.push_back(s);
        }
        q.task = custom_label_task(set, count_tokens);
      }
      break;
    }
    case TaskEndpoint::qa: {
      q.example.text = r.string("question", kMaxText, true).value();
      const json* options = r.get("options");
      const auto context = r.string("context", kMaxText);
      const auto name = r.string("task", 64);
      if ((options != nullptr) == context.has_value())
        throw bad_request("give either \"options\" ({\"A\": \"...\", ...}, multiple choice) or \"context\" "
                          "(an abstract: yes / no / maybe)",
                          options ? "context" : "options");
      q.task = named_task(name.value_or(options ? "medqa" : "pubmedqa"), TaskFamily::qa, endpoint);
      if (options) {
        if (!q.task.labels.empty())
          throw bad_request("task \"" + q.task.name + "\" answers " + q.task.labels.front() + "/...: give \"context\", not \"options\"",
                            "options");
        if (!options->is_object() || options->size() < 2 || options->size() > 26)
          throw bad_request("\"options\" must be an object of 2 to 26 options {\"A\": \"...\", \"B\": \"...\"}", "options");
        for (auto it = options->begin(); it != options->end(); ++it) {  // nlohmann objects iterate in key order
          const std::string& key = it.key();
          if (key.size() != 1 || key[0] < 'A' || key[0] > 'Z')
            throw bad_request("option keys must be single capital letters (A, B, ...)", "options");
          if (!it->is_string() || it->get_ref<const std::string&>().empty())
            throw bad_request("option " + key + " must be a non-empty string", "options");
          q.example.option_letters.push_back(key);
          q.example.option_texts.push_back(it->get<std::string>());
        }
      } else {
        if (q.task.labels.empty())
          throw bad_request("task \"" + q.task.name + "\" is multiple choice: give \"options\", not \"context\"", "context");
        q.example.context = *context;
        q.example.context_raw = *context;
      }
      break;
    }
  }
  r.done();
  q.example.id = "request";
  eval::PromptOptions options;
  options.chat = chat;
  q.prompt = eval::build_prompt(q.task, options, {}, q.example);
  q.max_tokens = q.task.max_new_tokens;
  return q;
}

json task_answer(const TaskQuery& q, const std::string& output) {
  const eval::Prediction pred = eval::parse_example_output(q.task, q.example, output, /*chain_of_thought=*/false);
  json out = {{"task", q.task.name}};
  switch (q.endpoint) {
    case TaskEndpoint::ner: {
      out["entity_class"] = q.task.entity_class;
      json entities = json::array();
      for (const eval::Span& s : pred.spans) {
        if (s.begin < 0 || s.end <= s.begin || static_cast<size_t>(s.end) > q.tokens.size()) continue;
        const TextToken& first = q.tokens[static_cast<size_t>(s.begin)];
        const TextToken& last = q.tokens[static_cast<size_t>(s.end - 1)];
        entities.push_back({{"text", q.text.substr(first.byte_begin, last.byte_end - first.byte_begin)},
                            {"start", first.char_begin},
                            {"end", last.char_end},
                            {"byte_start", first.byte_begin},
                            {"byte_end", last.byte_end}});
      }
      out["entities"] = std::move(entities);
      break;
    }
    case TaskEndpoint::relation:
      out["label"] = pred.parsed && !pred.labels.empty() ? json(pred.labels.front()) : json(nullptr);
      break;
    case TaskEndpoint::classify:
      out["labels"] = pred.labels;
      break;
    case TaskEndpoint::qa: {
      json answer = nullptr, answer_text = nullptr;
      if (pred.parsed && !pred.labels.empty()) {
        answer = pred.labels.front();
        const auto& letters = q.example.option_letters;
        const auto it = std::find(letters.begin(), letters.end(), pred.labels.front());
        if (it != letters.end()) answer_text = q.example.option_texts[static_cast<size_t>(it - letters.begin())];
      }
      out["answer"] = answer;
      out["answer_text"] = answer_text;
      break;
    }
  }
  out["parsed"] = pred.parsed;
  out["output"] = output;
  return out;
}

}  // namespace bioquant::serve
