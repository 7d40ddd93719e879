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

// The bounds on a LoadModelRequest, all checked before anything else is parsed, resolved or
// copied (unbounded, 100,000 dtype_overrides of 1 KiB keep 1.5 GB per load and make every
// ListModels reply too large). Over a bound: INVALID_ARGUMENT naming the field and the limit.
// Fixed, not flags: a real request is far inside each (SD's web UI sends a handful of overrides;
// the largest prefix list we know, a per-layer policy of a 70B llama, is ~700 entries).
struct LoadRequestLimits {
  size_t max_model_id_bytes = 256;
  size_t max_path_bytes = kMaxRequestPathBytes;  // 4096, path and vae_path
  size_t max_architecture_bytes = 128;
  size_t max_device_bytes = 64;
  size_t max_dtype_bytes = 64;  // dtype, compute_dtype and prediction
  size_t max_dtype_overrides = 1024;
  size_t max_dtype_override_key_bytes = 1024;
  size_t max_dtype_override_value_bytes = 32;
  size_t max_dtype_overrides_total_bytes = 64 << 10;  // keys and values together
  size_t max_compute_dtype_overrides = 64;
  size_t max_compute_dtype_override_key_bytes = 128;  // value: as max_dtype_bytes
};

// INVALID_ARGUMENT naming the first field over its bound in `limits`; reads only sizes.
absl::Status CheckLoadRequestLimits(const metaload::v1::LoadModelRequest& request,
                                    const LoadRequestLimits& limits = {});

// Converts a request to the cache's LoadSpec: checks the limits first, then validates dtype,
// device, path (resolved against the roots) and model_id (defaults to the path's stem).
absl::StatusOr<cache::LoadSpec> MakeLoadSpec(const metaload::v1::LoadModelRequest& request,
                                             const PathResolver& resolver,
                                             const LoadRequestLimits& limits = {});

// Moves the tensor's bytes out of `t` (no copy of raw_data).
cache::WireTensor FromProto(metaload::v1::Tensor* t);
// Moves the tensor's bytes out of `w`.
void ToProto(cache::WireTensor* w, metaload::v1::Tensor* out);
void ToProto(const cache::ModelInfo& info, metaload::v1::ModelInfo* out);
void ToProto(const cache::LoadResult& result, metaload::v1::LoadModelResponse* out);

}  // namespace metaload::service

#endif  // METALOAD_SERVER_SERVICE_REQUEST_CODEC_H_
