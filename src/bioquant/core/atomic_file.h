// Files that are either written whole or not at all: the content goes to a temporary file beside
// `path`, which is renamed over it only once everything was written. On any error the temporary
// file is removed and `path` keeps what it had.
#pragma once
#include <functional>
#include <ostream>
#include <string>

namespace bioquant {

void write_file_atomically(const std::string& path, const std::function<void(std::ostream&)>& write);

}  // namespace bioquant
