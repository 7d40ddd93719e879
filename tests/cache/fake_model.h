// A models::Model for cache tests: it holds no weights, reports the bytes the test gives it,
// and its Load waits on a Gate the test opens, so a race (a caller leaving, an Unload, a
// replace, an Infer) is set up step by step rather than timed against a real load. Plug it in
// through ModelCache::Options::build_model (FakeModels::Builder).
//
// Run("forward", {x}) returns {y = x * factor}: which model answered is visible in the values.
// Thread-safe.
#ifndef METALOAD_TESTS_CACHE_FAKE_MODEL_H_
#define METALOAD_TESTS_CACHE_FAKE_MODEL_H_

#include <ATen/ATen.h>

#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "server/core/checkpoint.h"
#include "server/core/mutex.h"
#include "server/models/model.h"

namespace metaload::cache::testing {

// Closed until Open(); WaitFor returns once it is open.
class Gate {
 public:
  explicit Gate(bool open = false) : open_(open) {}
  void Close() {
    core::MutexLock lock(&mu_);
    open_ = false;
  }
  void Open() {
    core::MutexLock lock(&mu_);
    open_ = true;
    cv_.notify_all();
  }
  // False if `timeout` passed first.
  bool WaitFor(std::chrono::milliseconds timeout) {
    core::MutexLock lock(&mu_);
    return lock.WaitFor(cv_, timeout, [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return open_; });
  }
  bool IsOpen() {
    core::MutexLock lock(&mu_);
    return open_;
  }

 private:
  core::Mutex mu_;
  std::condition_variable cv_;
  bool open_ ABSL_GUARDED_BY(mu_);
};

// What one checkpoint's fake model does; shared by the test and every model built for it.
struct FakeBehaviour {
  int64_t bytes = 1 << 20;
  float factor = 1;
  Gate release{/*open=*/true};  // Load returns once this is open (or the load is cancelled)
  Gate entered;                 // opened when a Load starts
  std::atomic<int> loads{0};    // Loads started
  Gate run{/*open=*/true};      // Run returns once this is open
  Gate running;                 // opened when a Run starts
  absl::Status fail;            // what Load returns once released (OK: it loads)
};

class FakeModel : public models::Model {
 public:
  explicit FakeModel(std::shared_ptr<FakeBehaviour> behaviour) : b_(std::move(behaviour)) {}

  std::string architecture() const override { return "fake"; }
  std::vector<models::EntrySpec> Entries() const override {
    return {
        {"forward", {{"x", core::DType::kFloat32, {-1}}}, {{"y", core::DType::kFloat32, {-1}}}}};
  }
  absl::StatusOr<core::LoadReport> Load(const core::CheckpointSource&, core::LoadOptions options,
                                        const models::ComputeChoice&) override {
    b_->loads.fetch_add(1);
    b_->entered.Open();
    while (!b_->release.WaitFor(std::chrono::milliseconds(1))) {
      if (options.cancel && options.cancel->load()) return absl::CancelledError("fake: cancelled");
    }
    if (options.cancel && options.cancel->load()) return absl::CancelledError("fake: cancelled");
    if (!b_->fail.ok()) return b_->fail;
    loaded_ = true;
    core::LoadReport report;
    report.loaded_bytes = static_cast<uint64_t>(b_->bytes);
    return report;
  }
  absl::StatusOr<models::NamedTensors> Run(
      const std::string& entry, const std::map<std::string, at::Tensor>& inputs) const override {
    auto x = inputs.find("x");
    if (x == inputs.end()) return absl::InvalidArgumentError("fake: no input 'x'");
    b_->running.Open();
    while (!b_->run.WaitFor(std::chrono::milliseconds(100))) {
    }
    return models::NamedTensors{{"y", x->second * b_->factor}};
  }
  ByteEstimate EstimateBytes(const core::CheckpointIndex&, const core::DtypePolicy&,
                             bool) const override {
    return {static_cast<uint64_t>(b_->bytes), /*upper_bound=*/true};
  }
  int64_t ParameterCount() const override { return 0; }
  uint64_t ResidentBytes() const override { return loaded_ ? static_cast<uint64_t>(b_->bytes) : 0; }

 private:
  std::shared_ptr<FakeBehaviour> b_;
  std::atomic<bool> loaded_{false};
};

// Checkpoint path (as the cache resolves it: index.path) -> its behaviour.
class FakeModels {
 public:
  std::shared_ptr<FakeBehaviour> For(const std::string& path) {
    core::MutexLock lock(&mu_);
    std::shared_ptr<FakeBehaviour>& b = by_path_[path];
    if (!b) b = std::make_shared<FakeBehaviour>();
    return b;
  }
  // For ModelCache::Options::build_model. The FakeModels must outlive the cache.
  auto Builder() {
    return [this](const std::string&, const core::CheckpointIndex& index)
               -> absl::StatusOr<std::unique_ptr<models::Model>> {
      return std::unique_ptr<models::Model>(new FakeModel(For(index.path)));
    };
  }

 private:
  core::Mutex mu_;
  std::map<std::string, std::shared_ptr<FakeBehaviour>> by_path_ ABSL_GUARDED_BY(mu_);
};

}  // namespace metaload::cache::testing

#endif  // METALOAD_TESTS_CACHE_FAKE_MODEL_H_
