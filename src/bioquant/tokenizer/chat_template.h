// Hugging Face chat templates: a Jinja2 subset that renders `chat_template` strings exactly as
// transformers' apply_chat_template does (jinja2 with trim_blocks, lstrip_blocks, loop controls,
// globals raise_exception / strftime_now / namespace / range, and json.dumps-style `tojson`).
//
// Values are JSON (nlohmann::ordered_json, so objects keep the caller's key order the way Python
// dicts do, which `tojson` output depends on). Python semantics are followed where templates can see
// them: `1.0` prints "1.0", `true` prints "True", none prints "None", a missing key or attribute is
// undefined (falsy, prints ""), `+` on a string and a number is an error, strings index by code point.
//
// Supported: {{ }}, {% %}, {# #} with '-'/'+' whitespace control; if/elif/else, for (loop.*, else,
// `if` filter, unpacking), set (also namespace attributes and block set), macro, filter blocks,
// break/continue, raw, transformers' {% generation %}; Python operators, slicing, tests, string and
// dict methods, and the filters templates use (trim, tojson, join, selectattr, map, items, ...).
// Not supported (an error names them): {% extends %}, {% include %}, {% import %}, {% block %},
// {% call %}, {% with %}, recursive loops, *args/**kwargs in calls, printf-style '%' on strings,
// integers beyond 64 bits and non-string dict keys. Known differences: tuples print as lists
// ("[1, 2]" where Python prints "(1, 2)"); upper/lower/title know ASCII, Latin-1, Latin Extended-A,
// Greek and Cyrillic only; Markup ("|safe") follows markupsafe in `+` (str + Markup escapes the str, as
// Mistral templates rely on) but is dropped by most filters.
#pragma once
#include <ctime>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace bioquant {

struct ChatMessage {
  std::string role;
  std::string content;
};

class ChatTemplate {
 public:
  // Parses `source` once; throws bioquant::Error (one line, with the line number) on syntax errors,
  // unknown tags, unknown filters and unknown tests.
  explicit ChatTemplate(std::string source);
  ~ChatTemplate();
  ChatTemplate(const ChatTemplate&);
  ChatTemplate& operator=(const ChatTemplate&);
  ChatTemplate(ChatTemplate&&) noexcept;
  ChatTemplate& operator=(ChatTemplate&&) noexcept;

  // Renders with the variables transformers passes: messages ([{role, content}]), add_generation_prompt,
  // bos_token, eos_token, tools = none and documents = none, then every key of `extra` (which may
  // override any of them, e.g. "tools", "date_string", or "messages" with extra fields).
  // Throws bioquant::Error when rendering fails; a template's raise_exception(msg) gives exactly msg.
  std::string render(const std::vector<ChatMessage>& messages, bool add_generation_prompt,
                     const std::string& bos_token, const std::string& eos_token,
                     const nlohmann::ordered_json& extra = nlohmann::ordered_json::object()) const;

  // Renders with exactly these variables (a JSON object; no defaults are added).
  std::string render(const nlohmann::ordered_json& context) const;

  // strftime_now(fmt) formats this time instead of the local clock (reproducible output);
  // std::nullopt goes back to the clock.
  void set_fixed_time(std::optional<std::tm> time) { fixed_time_ = time; }

  const std::string& source() const { return source_; }

 private:
  struct Program;
  std::string source_;
  std::shared_ptr<const Program> program_;  // immutable after parsing, so copies share it
  std::optional<std::tm> fixed_time_;
};

}  // namespace bioquant
