// JSON Lines (one JSON value a line), as the score, compare-runs, kld and tokenize inputs and the
// MedQA data are written: blank lines (spaces, tabs, a CR) are skipped, CRLF line ends accepted.
#pragma once
#include <functional>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

namespace bioquant::io {

// Calls each_line(value, where) for every line that is not blank, in order; where is "PATH:N" (N the
// 1-based line number) for messages about that line. A line that is not JSON throws
// bioquant::Error "PATH:N: not valid JSON", followed by " (expected EXPECTED)" when expected is given.
void for_each_json_line(std::string_view text, const std::string& path,
                        const std::function<void(nlohmann::json& value, const std::string& where)>& each_line,
                        std::string_view expected = "");

}  // namespace bioquant::io
