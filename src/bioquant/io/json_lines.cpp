#include "bioquant/io/json_lines.h"

#include "bioquant/core/error.h"

namespace bioquant::io {

void for_each_json_line(std::string_view text, const std::string& path,
                        const std::function<void(nlohmann::json& value, const std::string& where)>& each_line,
                        std::string_view expected) {
  size_t pos = 0, line_no = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string_view::npos) end = text.size();
    const std::string_view line = text.substr(pos, end - pos);
    pos = end + 1;
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string_view::npos) continue;
    const std::string where = path + ":" + std::to_string(line_no);
    nlohmann::json value;
    try {
      value = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception&) {
      throw Error(where + ": not valid JSON" + (expected.empty() ? "" : " (expected " + std::string(expected) + ")"));
    }
    each_line(value, where);
  }
}

}  // namespace bioquant::io
