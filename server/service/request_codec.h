// metaload.v1 messages <-> the cache's plain types, with the checks on what a caller sent. Only
// protobuf messages here (no gRPC, no LibTorch), so the fuzzers can drive it directly.
#ifndef METALOAD_SERVER_SERVICE_REQUEST_CODEC_H_
#define METALOAD_SERVER_SERVICE_REQUEST_CODEC_H_

#include "absl/status/statusor.h"
#include "metaload/v1/metaload.pb.h"
#include "server/cache/model_cache.h"
#include "server/cache/wire_tensor.h"
#include "server/service/path_resolver.h"

namespace metaload::service {

// Converts a request to the cache's LoadSpec: validates dtype, device, path (resolved against
// the roots) and model_id (defaults to the path's stem, at most 256 bytes).
absl::StatusOr<cache::LoadSpec> MakeLoadSpec(const metaload::v1::LoadModelRequest& request,
                                             const PathResolver& resolver);

// Moves the tensor's bytes out of `t` (no copy of raw_data).
cache::WireTensor FromProto(metaload::v1::Tensor* t);
// Moves the tensor's bytes out of `w`.
void ToProto(cache::WireTensor* w, metaload::v1::Tensor* out);
void ToProto(const cache::ModelInfo& info, metaload::v1::ModelInfo* out);
void ToProto(const cache::LoadResult& result, metaload::v1::LoadModelResponse* out);

}  // namespace metaload::service

#endif  // METALOAD_SERVER_SERVICE_REQUEST_CODEC_H_
