// grpc.reflection.v1.ServerReflection, served by metaloadd itself: Debian's gRPC 1.51 ships only
// the v1alpha service (served beside this one by gRPC's plugin), while current grpcurl and
// Postman ask for v1 first. Answers from protobuf's generated descriptor pool, as v1alpha does:
// list_services (the names the daemon registers), file_by_filename, file_containing_symbol,
// file_containing_extension and all_extension_numbers_of_type. A file comes with the files it
// imports, each sent once per stream. An unknown name is an error_response (NOT_FOUND) on the
// stream, never a failed call. Like v1alpha it is not served when an auth token is set (it is a
// sync service, outside the token check; README "Threat model").
//
// gRPC only; thread-safe (each stream is handled on its own).
#ifndef METALOAD_SERVER_SERVICE_REFLECTION_V1_H_
#define METALOAD_SERVER_SERVICE_REFLECTION_V1_H_

#include <string>
#include <vector>

#include "grpc/reflection/v1/reflection.grpc.pb.h"

namespace metaload::service {

class ReflectionV1 final : public grpc::reflection::v1::ServerReflection::Service {
 public:
  // `services`: the full names list_services answers with.
  explicit ReflectionV1(std::vector<std::string> services) : services_(std::move(services)) {}

  grpc::Status ServerReflectionInfo(
      grpc::ServerContext* context,
      grpc::ServerReaderWriter<grpc::reflection::v1::ServerReflectionResponse,
                               grpc::reflection::v1::ServerReflectionRequest>* stream) override;

 private:
  const std::vector<std::string> services_;
};

}  // namespace metaload::service

#endif  // METALOAD_SERVER_SERVICE_REFLECTION_V1_H_
