// The one place where exceptions become absl::Status (server/README.md, "Exceptions"). LibTorch,
// nlohmann::json and the standard library throw; metaload's own code returns Status. Every call
// into them that can throw on untrusted input (a checkpoint's shapes and config.json, a request's
// tensors) runs inside CatchExceptions, named by the model, file or key it works on, so no
// exception crosses a thread or reaches a gRPC callback.
//
// Mapping (CurrentExceptionToStatus):
//   c10::OutOfMemoryError (CUDA), std::bad_alloc, LibTorch's CPU allocator failure
//                                   -> RESOURCE_EXHAUSTED
//   any other std::exception (c10::Error, nlohmann::json::exception, ...) -> `code`
//                                      (FAILED_PRECONDITION unless the caller says otherwise)
//   anything else                   -> INTERNAL
// The message is "<context>: <first line of what()>", at most 300 bytes of it, without
// LibTorch's C++ backtrace.
//
// Stateless; thread-safe. The header is free of LibTorch types.
#ifndef METALOAD_SERVER_CORE_EXCEPTION_BOUNDARY_H_
#define METALOAD_SERVER_CORE_EXCEPTION_BOUNDARY_H_

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace metaload::core {

// Classifies the exception being handled. IMPORTANT: call only inside a catch block.
absl::Status CurrentExceptionToStatus(
    absl::string_view context, absl::StatusCode code = absl::StatusCode::kFailedPrecondition);

// Runs `f` (returning absl::Status or absl::StatusOr<T>); an exception becomes its Status.
template <typename F>
auto CatchExceptions(absl::string_view context, F&& f,
                     absl::StatusCode code = absl::StatusCode::kFailedPrecondition)
    -> decltype(f()) {
  try {
    return f();
  } catch (...) {
    return CurrentExceptionToStatus(context, code);
  }
}

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_EXCEPTION_BOUNDARY_H_
