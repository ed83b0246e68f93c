#include "bioquant/core/atomic_file.h"

#include <unistd.h>

#include <cstdio>
#include <fstream>

#include "bioquant/core/error.h"

namespace bioquant {

void write_file_atomically(const std::string& path, const std::function<void(std::ostream&)>& write) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  try {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    check(static_cast<bool>(out), tmp + ": cannot create");
    write(out);
    out.flush();
    check(static_cast<bool>(out), tmp + ": write failed (disk full?)");
  } catch (...) {
    std::remove(tmp.c_str());
    throw;
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw Error(path + ": cannot rename the written file into place");
  }
}

}  // namespace bioquant
