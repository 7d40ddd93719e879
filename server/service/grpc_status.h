// The one place where absl::Status becomes grpc::Status. Handlers return absl::Status from the
// layers below and convert here, so the mapping of the error table
// (proto/README.md, "Errors") lives in one function.
#ifndef METALOAD_SERVER_SERVICE_GRPC_STATUS_H_
#define METALOAD_SERVER_SERVICE_GRPC_STATUS_H_

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace metaload::service {

// Same code (absl and gRPC share the numbering), same message.
grpc::Status ToGrpcStatus(const absl::Status& status);

}  // namespace metaload::service

#endif  // METALOAD_SERVER_SERVICE_GRPC_STATUS_H_
