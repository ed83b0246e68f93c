// Errors: one exception type whose message is a single human-readable line.
// The CLI prints it as "error: <message>" and exits non-zero.
#pragma once
#include <stdexcept>
#include <string>

namespace bioquant {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

// Throws bioquant::Error with `message` when `condition` is false.
inline void check(bool condition, const std::string& message) {
  if (!condition) throw Error(message);
}

}  // namespace bioquant
