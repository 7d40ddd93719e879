// A load's progress, as the caller's callback sees it, and the reporter that feeds it from many
// copy threads at once: serialised (one callback at a time) and rate-limited (every 64 MiB or
// 100 ms, whichever comes first), so a fast load does not flood a gRPC stream.
//
// Thread-safe: Add from any number of threads; Done once, after the last Add.
#ifndef METALOAD_SERVER_CORE_PROGRESS_REPORTER_H_
#define METALOAD_SERVER_CORE_PROGRESS_REPORTER_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <string>

#include "server/core/mutex.h"

namespace metaload::core {

struct LoadProgress {
  std::string phase;  // "read" while loading, "done" at the end
  uint64_t bytes_done = 0;
  uint64_t bytes_total = 0;
};

class ProgressReporter {
 public:
  using Clock = std::chrono::steady_clock;
  static constexpr uint64_t kEveryBytes = 64 << 20;
  static constexpr Clock::duration kEvery = std::chrono::milliseconds(100);

  // `fn` may be empty (nothing is reported) and must outlive the reporter.
  ProgressReporter(const std::function<void(const LoadProgress&)>& fn, uint64_t total)
      : fn_(fn), total_(total), last_time_(Clock::now()) {}

  // `bytes` more are done. Reports when due and nobody else is reporting right now (the next
  // chunk will, rather than a copy thread waiting on the callback).
  void Add(uint64_t bytes);
  // The final "done" report.
  void Done();

 private:
  const std::function<void(const LoadProgress&)>& fn_;
  const uint64_t total_;
  std::atomic<uint64_t> done_{0};
  Mutex mu_;  // held while the callback runs
  uint64_t last_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  Clock::time_point last_time_ ABSL_GUARDED_BY(mu_);
};

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_PROGRESS_REPORTER_H_
