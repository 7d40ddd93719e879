#include "server/service/call_tracker.h"

namespace metaload::service {
namespace {

// Lives exactly as long as its call: gRPC creates it with the call and destroys it after the
// status has been sent.
class CountingInterceptor : public grpc::experimental::Interceptor {
 public:
  explicit CountingInterceptor(CallTracker* tracker) : tracker_(tracker) {
    tracker_->CallStarted();
  }
  ~CountingInterceptor() override { tracker_->CallFinished(); }
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    methods->Proceed();
  }

 private:
  CallTracker* tracker_;
};

class CountingFactory : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit CountingFactory(CallTracker* tracker) : tracker_(tracker) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    return new CountingInterceptor(tracker_);
  }

 private:
  CallTracker* tracker_;
};

}  // namespace

std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>
CallTracker::MakeInterceptorFactory() {
  return std::make_unique<CountingFactory>(this);
}

int64_t CallTracker::active() const {
  std::lock_guard<std::mutex> lock(mu_);
  return active_;
}

void CallTracker::CallStarted() {
  std::lock_guard<std::mutex> lock(mu_);
  ++active_;
}

void CallTracker::CallFinished() {
  std::lock_guard<std::mutex> lock(mu_);
  if (--active_ == 0) idle_.notify_all();
}

bool CallTracker::WaitIdle(absl::Time deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  return idle_.wait_until(lock, absl::ToChronoTime(deadline), [this] { return active_ == 0; });
}

}  // namespace metaload::service
