// Reads this process's memory and resource figures from /proc/self: resident set, its
// high-water mark (the kernel's VmHWM), thread count and open file descriptors. Used for the
// per-load peak host bytes and the process gauges. Stateless and thread-safe.
#ifndef METALOAD_SERVER_CORE_PROCESS_MEMORY_H_
#define METALOAD_SERVER_CORE_PROCESS_MEMORY_H_

#include <cstdint>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace metaload::core {

struct ProcessMemory {
  int64_t rss_bytes = 0;       // VmRSS
  int64_t peak_rss_bytes = 0;  // VmHWM: the highest RSS since start (or the last reset)
  int64_t threads = 0;         // Threads
};

// Parses the text of /proc/<pid>/status. DATA_LOSS-class error when a field is missing.
absl::StatusOr<ProcessMemory> ParseProcStatus(absl::string_view text);

// Reads /proc/self/status.
absl::StatusOr<ProcessMemory> ReadProcessMemory();

// Number of entries in /proc/self/fd, or -1 when it cannot be read.
int64_t CountOpenFds();

// Resets the kernel's high-water mark (VmHWM) to the current RSS by writing "5" to
// /proc/self/clear_refs, so a load can measure its own peak. Returns false where the kernel
// refuses (then callers fall back to sampling). The mark it erases is kept first (see below).
bool ResetPeakRss();

// The highest RSS since the process started, across every ResetPeakRss: the larger of the
// current VmHWM and each VmHWM a reset erased. (VmHWM alone is only the peak since the last
// load began: issue 17 found metaload_process_peak_rss_bytes wrong after the first load.)
int64_t ProcessPeakRssBytes();

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_PROCESS_MEMORY_H_
