// Progress lines of long work (eval, sweep, kld): durations, and how often a log (not a terminal) gets a line.
#include <gtest/gtest.h>

#include <unistd.h>

#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "bioquant/core/progress.h"

namespace bioquant {
namespace {

TEST(Progress, FormatsSecondsByMagnitude) {
  EXPECT_EQ(format_seconds(0), "0.0s");
  EXPECT_EQ(format_seconds(4.24), "4.2s");
  EXPECT_EQ(format_seconds(42.4), "42s");
  EXPECT_EQ(format_seconds(185), "3m05s");
  EXPECT_EQ(format_seconds(3720), "1h02m");
  EXPECT_EQ(format_seconds(-1), "?");
  EXPECT_EQ(format_seconds(1e300), "?");
  EXPECT_EQ(format_seconds(std::numeric_limits<double>::quiet_NaN()), "?");
}

std::vector<std::string> lines_of(const std::string& s) {
  std::vector<std::string> out;
  std::istringstream in(s);
  for (std::string line; std::getline(in, line);) out.push_back(line);
  return out;
}

// Into a log: a line at each tenth of the work, the last one once, each with the count, unit and extra text.
TEST(Progress, ALogGetsALineATenth) {
  if (isatty(2)) GTEST_SKIP() << "stderr is a terminal: lines are rewritten in place";
  testing::internal::CaptureStderr();
  {
    ProgressLine p(true, "task", "things", "th/s", 100);
    for (size_t i = 1; i <= 100; ++i) p.update(i, "bad " + std::to_string(i / 10));
    p.update(100, "bad 10", true);
    ProgressLine off(false, "quiet", "things", "th/s", 5);
    for (size_t i = 1; i <= 5; ++i) off.update(i, "", i == 5);
    ProgressLine resumed(true, "again", "things", "th/s", 20, 15);
    for (size_t i = 16; i <= 20; ++i) resumed.update(i, "", i == 20);
  }
  const std::vector<std::string> lines = lines_of(testing::internal::GetCapturedStderr());
  ASSERT_EQ(lines.size(), 13u);
  for (size_t k = 0; k < 10; ++k) {
    const std::string head = "[task] " + std::to_string(10 * (k + 1)) + "/100 things  ";
    EXPECT_EQ(lines[k].rfind(head, 0), 0u) << lines[k];
    EXPECT_NE(lines[k].find(" th/s  ETA "), std::string::npos) << lines[k];
    EXPECT_TRUE(lines[k].ends_with("  bad " + std::to_string(k + 1))) << lines[k];
  }
  EXPECT_NE(lines[9].find("ETA 0s"), std::string::npos) << lines[9];
  // Resumed at 15 of 20 (seven tenths): the eighth, ninth and tenth tenths.
  EXPECT_EQ(lines[10].rfind("[again] 16/20 things", 0), 0u) << lines[10];
  EXPECT_EQ(lines[11].rfind("[again] 18/20 things", 0), 0u) << lines[11];
  EXPECT_EQ(lines[12].rfind("[again] 20/20 things", 0), 0u) << lines[12];
}

}  // namespace
}  // namespace bioquant
