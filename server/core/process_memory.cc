#include "server/core/process_memory.h"

#include <dirent.h>
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace metaload::core {
namespace {

// Parses "   12345 kB" into bytes.
bool ParseKilobytes(absl::string_view value, int64_t* bytes) {
  value = absl::StripAsciiWhitespace(value);
  if (!absl::ConsumeSuffix(&value, "kB")) return false;
  int64_t kb = 0;
  if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(value), &kb) || kb < 0) return false;
  *bytes = kb * 1024;
  return true;
}

}  // namespace

absl::StatusOr<ProcessMemory> ParseProcStatus(absl::string_view text) {
  ProcessMemory out;
  bool have_rss = false, have_hwm = false, have_threads = false;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    std::pair<absl::string_view, absl::string_view> kv =
        absl::StrSplit(line, absl::MaxSplits(':', 1));
    if (kv.first == "VmRSS") {
      have_rss = ParseKilobytes(kv.second, &out.rss_bytes);
    } else if (kv.first == "VmHWM") {
      have_hwm = ParseKilobytes(kv.second, &out.peak_rss_bytes);
    } else if (kv.first == "Threads") {
      have_threads = absl::SimpleAtoi(absl::StripAsciiWhitespace(kv.second), &out.threads);
    }
  }
  if (!have_rss || !have_hwm || !have_threads) {
    return absl::DataLossError(
        absl::StrCat("/proc status: missing or malformed ", !have_rss   ? "VmRSS"
                                                            : !have_hwm ? "VmHWM"
                                                                        : "Threads"));
  }
  return out;
}

absl::StatusOr<ProcessMemory> ReadProcessMemory() {
  int fd = ::open("/proc/self/status", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::UnavailableError("cannot open /proc/self/status");
  std::string text;
  char buf[4096];
  ssize_t n;
  while ((n = ::read(fd, buf, sizeof(buf))) > 0) text.append(buf, static_cast<size_t>(n));
  ::close(fd);
  return ParseProcStatus(text);
}

int64_t CountOpenFds() {
  DIR* dir = ::opendir("/proc/self/fd");
  if (dir == nullptr) return -1;
  int64_t count = 0;
  while (struct dirent* e = ::readdir(dir)) {
    if (e->d_name[0] != '.') ++count;
  }
  ::closedir(dir);
  return count - 1;  // the descriptor opendir itself holds
}

namespace {
// Highest VmHWM erased by a reset; a racing reset may keep a slightly older mark, never a
// larger one than was reached.
std::atomic<int64_t> erased_peak{0};

void FoldPeak(int64_t peak) {
  int64_t seen = erased_peak.load();
  while (peak > seen && !erased_peak.compare_exchange_weak(seen, peak)) {
  }
}
}  // namespace

int64_t ProcessPeakRssBytes() {
  absl::StatusOr<ProcessMemory> now = ReadProcessMemory();
  if (now.ok()) FoldPeak(now->peak_rss_bytes);
  return erased_peak.load();
}

bool ResetPeakRss() {
  if (absl::StatusOr<ProcessMemory> now = ReadProcessMemory(); now.ok()) {
    FoldPeak(now->peak_rss_bytes);
  }
  int fd = ::open("/proc/self/clear_refs", O_WRONLY | O_CLOEXEC);
  if (fd < 0) return false;
  bool ok = ::write(fd, "5", 1) == 1;
  ::close(fd);
  return ok;
}

}  // namespace metaload::core
