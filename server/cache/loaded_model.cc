#include "server/cache/loaded_model.h"

#include <malloc.h>

#include <chrono>
#include <future>

#include "absl/time/clock.h"
#include "server/models/model.h"

namespace metaload::cache {

int64_t NowMs() { return absl::ToUnixMillis(absl::Now()); }

uint64_t NextUse() {
  static std::atomic<uint64_t> counter{0};
  return counter.fetch_add(1) + 1;
}

void Releaser::Release(std::unique_ptr<models::Model> model, const std::string& device,
                       int64_t bytes) {
  if (!model) return;
  std::shared_ptr<models::Model> doomed = std::move(model);  // the pool's tasks are copyable
  pool_.Submit([observer = observer_, doomed = std::move(doomed), device, bytes]() mutable {
    const auto start = std::chrono::steady_clock::now();
    doomed.reset();
    ::malloc_trim(0);
    if (observer) {
      observer->OnModelFreed(
          device, bytes,
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
  });
}

void Releaser::Flush() {
  std::promise<void> done;
  pool_.Submit([&done] { done.set_value(); });
  done.get_future().wait();
}

// The pages go back to the kernel at once: RAM that is never returned on model switches is
// the web UI users' top complaint about loaders.
Loaded::~Loaded() {
  if (releaser) releaser->Release(std::move(model), device, resident_bytes);
}

}  // namespace metaload::cache
