#include "server/core/log.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <regex>

#include "tests/test_util.h"

namespace metaload::core {
namespace {

// Runs `emit` with stderr redirected to a file and returns what it wrote.
template <typename Fn>
std::string CaptureStderr(Fn emit) {
  testing::TempDir dir;
  std::string path = dir / "stderr";
  int saved = ::dup(2);
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  ::dup2(fd, 2);
  emit();
  ::dup2(saved, 2);
  ::close(fd);
  ::close(saved);
  return testing::ReadFileOrEmpty(path);
}

TEST(LogTest, FormatsOneLogfmtLine) {
  std::string out = CaptureStderr([] {
    LogInfo("model_loaded").Kv("model_id", "sd15").Kv("bytes", int64_t{4096}).Kv("seconds", 1.5);
  });
  std::regex line(
      R"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z info event=model_loaded model_id=sd15 bytes=4096 seconds=1.5\n)");
  EXPECT_TRUE(std::regex_match(out, line)) << out;
}

TEST(LogTest, QuotesValuesThatWouldBreakTheLine) {
  EXPECT_EQ(FormatLogValue("plain"), "plain");
  EXPECT_EQ(FormatLogValue(""), "\"\"");
  EXPECT_EQ(FormatLogValue("two words"), "\"two words\"");
  EXPECT_EQ(FormatLogValue("a=b"), "\"a=b\"");
  EXPECT_EQ(FormatLogValue("say \"hi\"\n"), "\"say \\\"hi\\\"\\n\"");
  EXPECT_EQ(FormatLogValue(std::string("nul\0x", 5)), "\"nul\\x00x\"");
}

TEST(LogTest, MinLevelDropsLowerLines) {
  SetMinLogLevel(LogLevel::kWarning);
  std::string out = CaptureStderr([] {
    LogInfo("dropped");
    LogWarning("kept").Kv("k", "v");
  });
  SetMinLogLevel(LogLevel::kInfo);
  EXPECT_EQ(out.find("dropped"), std::string::npos);
  EXPECT_NE(out.find("warning event=kept k=v"), std::string::npos) << out;
}

TEST(LogTest, ParsesLevels) {
  LogLevel level = LogLevel::kInfo;
  EXPECT_TRUE(ParseLogLevel("debug", &level));
  EXPECT_EQ(level, LogLevel::kDebug);
  EXPECT_TRUE(ParseLogLevel("error", &level));
  EXPECT_EQ(level, LogLevel::kError);
  EXPECT_FALSE(ParseLogLevel("verbose", &level));
  EXPECT_EQ(level, LogLevel::kError);
}

}  // namespace
}  // namespace metaload::core
