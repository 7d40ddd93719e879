// Counts the gRPC calls in flight on the server, every service included (ModelLoader, health,
// reflection), through a server interceptor. Drain uses it to stop as soon as the last call has
// finished instead of always waiting out the grace period (idle client connections would
// otherwise hold a graceful shutdown for seconds).
//
// The tracker must outlive the server it is installed in. Thread-safe.
#ifndef METALOAD_SERVER_SERVICE_CALL_TRACKER_H_
#define METALOAD_SERVER_SERVICE_CALL_TRACKER_H_

#include <grpcpp/support/server_interceptor.h>

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>

#include "absl/time/time.h"

namespace metaload::service {

class CallTracker {
 public:
  // A factory to hand to ServerBuilder::experimental().SetInterceptorCreators().
  std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface> MakeInterceptorFactory();

  int64_t active() const;
  // Blocks until no call is in flight or `deadline` passes; true when idle.
  bool WaitIdle(absl::Time deadline);

  // Called for every finished call: method (last path component, e.g. "LoadModel"), gRPC code
  // name, seconds. Set before the server starts.
  using Observer =
      std::function<void(const std::string& method, const std::string& code, double seconds)>;
  void SetObserver(Observer observer) { observer_ = std::move(observer); }

  // Called by the interceptors.
  void CallStarted();
  // The call's outcome, for the observer; reported as its status is sent (before the client can
  // see it), or when the call ends without one (CANCELLED).
  void CallCompleted(const std::string& method, int code, double seconds);
  void CallEnded();

 private:
  mutable std::mutex mu_;
  std::condition_variable idle_;
  int64_t active_ = 0;  // guarded by mu_
  Observer observer_;
};

}  // namespace metaload::service

#endif  // METALOAD_SERVER_SERVICE_CALL_TRACKER_H_
