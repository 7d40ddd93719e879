#include "server/service/call_tracker.h"

#include <chrono>

#include "absl/status/status.h"

namespace metaload::service {
namespace {

// Lives exactly as long as its call: gRPC creates it with the call and destroys it after the
// status has been sent.
class CountingInterceptor : public grpc::experimental::Interceptor {
 public:
  CountingInterceptor(CallTracker* tracker, const char* method)
      : tracker_(tracker),
        method_(method != nullptr ? method : ""),
        start_(std::chrono::steady_clock::now()) {
    tracker_->CallStarted();
  }
  ~CountingInterceptor() override {
    if (!reported_) Report(static_cast<int>(grpc::StatusCode::CANCELLED));  // cut, no status
    tracker_->CallEnded();
  }
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    if (methods->QueryInterceptionHookPoint(
            grpc::experimental::InterceptionHookPoints::PRE_SEND_STATUS)) {
      Report(static_cast<int>(methods->GetSendStatus().error_code()));
    }
    methods->Proceed();
  }

 private:
  CallTracker* tracker_;
  std::string method_;
  std::chrono::steady_clock::time_point start_;
  bool reported_ = false;

  void Report(int code) {
    reported_ = true;
    const size_t slash = method_.rfind('/');
    tracker_->CallCompleted(
        slash == std::string::npos ? method_ : method_.substr(slash + 1), code,
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count());
  }
};

class CountingFactory : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit CountingFactory(CallTracker* tracker) : tracker_(tracker) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo* info) override {
    return new CountingInterceptor(tracker_, info->method());
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

void CallTracker::CallCompleted(const std::string& method, int code, double seconds) {
  if (observer_)
    observer_(method, absl::StatusCodeToString(static_cast<absl::StatusCode>(code)), seconds);
}

void CallTracker::CallEnded() {
  std::lock_guard<std::mutex> lock(mu_);
  if (--active_ == 0) idle_.notify_all();
}

bool CallTracker::WaitIdle(absl::Time deadline) {
  std::unique_lock<std::mutex> lock(mu_);
  return idle_.wait_until(lock, absl::ToChronoTime(deadline), [this] { return active_ == 0; });
}

}  // namespace metaload::service
