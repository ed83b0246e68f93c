#include "bioquant/core/memory.h"

#include <cstdio>
#include <cstring>

namespace bioquant {
namespace {

size_t status_kib(const char* key) {
  std::FILE* f = std::fopen("/proc/self/status", "r");
  if (f == nullptr) return 0;
  char line[256];
  size_t kib = 0;
  const size_t len = std::strlen(key);
  while (std::fgets(line, sizeof line, f)) {
    if (std::strncmp(line, key, len) == 0) {
      std::sscanf(line + len, "%zu", &kib);
      break;
    }
  }
  std::fclose(f);
  return kib * 1024;
}

}  // namespace

size_t peak_rss_bytes() { return status_kib("VmHWM:"); }
size_t current_rss_bytes() { return status_kib("VmRSS:"); }

bool reset_peak_rss() {
  std::FILE* f = std::fopen("/proc/self/clear_refs", "w");
  if (f == nullptr) return false;
  const bool ok = std::fputs("5", f) >= 0;
  return std::fclose(f) == 0 && ok;
}

}  // namespace bioquant
