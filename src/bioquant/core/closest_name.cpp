#include "bioquant/core/closest_name.h"

#include <algorithm>
#include <cstdint>

namespace bioquant {

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

std::string closest_name(const std::string& name, const std::vector<std::string>& candidates) {
  std::string best;
  size_t best_distance = SIZE_MAX;
  for (const auto& c : candidates) {
    const size_t d = edit_distance(name, c);
    const bool close = d <= std::max<size_t>(1, std::min(name.size(), c.size()) / 3) ||
                       (name.size() >= 3 && c.rfind(name, 0) == 0) || (c.size() >= 3 && name.rfind(c, 0) == 0);
    if (close && d < best_distance) best_distance = d, best = c;
  }
  return best;
}

}  // namespace bioquant
