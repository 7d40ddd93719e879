#include "server/core/progress_reporter.h"

namespace metaload::core {

void ProgressReporter::Add(uint64_t bytes) {
  const uint64_t done = done_.fetch_add(bytes) + bytes;
  if (!fn_) return;
  if (!mu_.TryLock()) return;
  MutexLock held(&mu_, kAdoptLock);
  const auto now = Clock::now();
  if (done - last_bytes_ < kEveryBytes && now - last_time_ < kEvery) return;
  last_bytes_ = done;
  last_time_ = now;
  fn_({"read", done, total_});
}

void ProgressReporter::Done() {
  if (!fn_) return;
  MutexLock lock(&mu_);
  fn_({"done", done_.load(), total_});
}

}  // namespace metaload::core
