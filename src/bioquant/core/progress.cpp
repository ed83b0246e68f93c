#include "bioquant/core/progress.h"

#include <unistd.h>

#include <cstdio>
#include <utility>

namespace bioquant {

std::string format_seconds(double seconds) {
  if (!(seconds >= 0) || seconds > 1e7) return "?";
  const long total = static_cast<long>(seconds + 0.5);
  char buf[32];
  if (total >= 3600) std::snprintf(buf, sizeof buf, "%ldh%02ldm", total / 3600, (total % 3600) / 60);
  else if (total >= 60) std::snprintf(buf, sizeof buf, "%ldm%02lds", total / 60, total % 60);
  else if (seconds >= 10) std::snprintf(buf, sizeof buf, "%lds", total);
  else std::snprintf(buf, sizeof buf, "%.1fs", seconds);
  return buf;
}

ProgressLine::ProgressLine(bool enabled, std::string label, std::string unit, std::string rate_unit, size_t total,
                           size_t done)
    : enabled_(enabled), tty_(isatty(2) != 0), label_(std::move(label)), unit_(std::move(unit)),
      rate_unit_(std::move(rate_unit)), total_(total), start_done_(done), start_(Clock::now()), last_(start_),
      last_decile_(total ? done * 10 / total : 0) {}

void ProgressLine::update(size_t done, const std::string& extra, bool final) {
  if (!enabled_ || (final && printed_ == done)) return;
  const auto now = Clock::now();
  const double elapsed = std::chrono::duration<double>(now - start_).count();
  const double rate = elapsed > 0 && done >= start_done_ ? static_cast<double>(done - start_done_) / elapsed : 0;
  const double eta = rate > 0 && total_ >= done ? static_cast<double>(total_ - done) / rate : -1;
  const size_t decile = total_ ? done * 10 / total_ : 0;
  const bool slow = std::chrono::duration<double>(now - last_).count() > 30;
  if (!tty_ && !final && decile == last_decile_ && !slow) return;
  last_decile_ = decile;
  last_ = now;
  printed_ = done;
  std::fprintf(stderr, "%s[%s] %zu/%zu %s  %.2f %s  ETA %s%s%s%s", tty_ ? "\r" : "", label_.c_str(), done, total_,
               unit_.c_str(), rate, rate_unit_.c_str(), final || done >= total_ ? "0s" : format_seconds(eta).c_str(),
               extra.empty() ? "" : "  ", extra.c_str(), tty_ && !final ? "   " : "\n");
  std::fflush(stderr);
}

}  // namespace bioquant
