// Structured one-line logs: `TIME LEVEL event=NAME key=value ...` on stderr (logfmt style).
//
// A LogLine collects key=value pairs and writes the whole line with one write(2) when it is
// destroyed, so lines from different threads never interleave. Values containing spaces, quotes
// or '=' are quoted. Thread-safe.
#ifndef METALOAD_SERVER_CORE_LOG_H_
#define METALOAD_SERVER_CORE_LOG_H_

#include <cstdint>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace metaload::core {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

// Lines below this level are dropped. Default: kInfo.
void SetMinLogLevel(LogLevel level);
// Parses "debug", "info", "warning", "error"; false on anything else.
bool ParseLogLevel(absl::string_view text, LogLevel* level);

class LogLine {
 public:
  LogLine(LogLevel level, absl::string_view event);
  ~LogLine();
  LogLine(const LogLine&) = delete;
  LogLine& operator=(const LogLine&) = delete;

  LogLine& Kv(absl::string_view key, absl::string_view value);
  LogLine& Kv(absl::string_view key, const char* value) {
    return Kv(key, absl::string_view(value));
  }
  LogLine& Kv(absl::string_view key, const std::string& value) {
    return Kv(key, absl::string_view(value));
  }
  template <typename T>
  LogLine& Kv(absl::string_view key, T value) {
    return Kv(key, absl::string_view(absl::StrCat(value)));
  }

 private:
  bool enabled_;
  std::string line_;
};

inline LogLine LogDebug(absl::string_view event) { return LogLine(LogLevel::kDebug, event); }
inline LogLine LogInfo(absl::string_view event) { return LogLine(LogLevel::kInfo, event); }
inline LogLine LogWarning(absl::string_view event) { return LogLine(LogLevel::kWarning, event); }
inline LogLine LogError(absl::string_view event) { return LogLine(LogLevel::kError, event); }

// Formats a log line without writing it; exposed for tests.
std::string FormatLogValue(absl::string_view value);

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_LOG_H_
