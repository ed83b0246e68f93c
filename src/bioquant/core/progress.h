// Progress of long work on stderr: done/total, rate and ETA, rewritten in place on a terminal and
// a line every ~10% of the work (or 30 s) otherwise, so that logs stay short.
#pragma once
#include <chrono>
#include <cstddef>
#include <string>

namespace bioquant {

// "4.2s", "42s", "3m05s", "1h02m"; "?" for a negative, infinite or absurd duration.
std::string format_seconds(double seconds);

class ProgressLine {
 public:
  // "[label] done/total unit  rate rate_unit  ETA ..."; `done` is where a resumed run starts (not in the rate).
  ProgressLine(bool enabled, std::string label, std::string unit, std::string rate_unit, size_t total, size_t done = 0);
  // `extra` is appended to the line ("unparsed 3"). The final update always prints, once.
  void update(size_t done, const std::string& extra = "", bool final = false);

 private:
  using Clock = std::chrono::steady_clock;
  bool enabled_, tty_;
  std::string label_, unit_, rate_unit_;
  size_t total_, start_done_;
  Clock::time_point start_, last_;
  size_t last_decile_ = 0;
  size_t printed_ = static_cast<size_t>(-1);
};

}  // namespace bioquant
