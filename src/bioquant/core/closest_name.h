// "Did you mean ...?" for a mistyped name (a task, a command, an option).
#pragma once
#include <cstddef>
#include <string>
#include <vector>

namespace bioquant {

// Levenshtein distance (insertions, deletions, substitutions).
size_t edit_distance(const std::string& a, const std::string& b);

// The candidate closest to `name`, if any is close: within a third of the shorter length in edits (at
// least one), or one that begins `name` or that `name` begins (3+ characters: "evaluate" -> "eval").
// "" when none is, so "nope" suggests nothing.
std::string closest_name(const std::string& name, const std::vector<std::string>& candidates);

}  // namespace bioquant
