// One Infer's work, off the cache: decodes the wire inputs (tensor_codec.h), runs the entry and
// encodes its outputs. The cache decides whether and where an Infer runs (model_cache.h); this
// is what runs. Exceptions become Status naming `what` (core::CatchExceptions). Stateless;
// the model's Run is const and thread-safe, so any number may run at once.
#ifndef METALOAD_SERVER_CACHE_INFER_CALL_H_
#define METALOAD_SERVER_CACHE_INFER_CALL_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/cache/wire_tensor.h"

namespace metaload::models {
class Model;
}  // namespace metaload::models

namespace metaload::cache {

// INVALID_ARGUMENT for an input given twice or one the codec or the entry refuses.
// `typed_outputs`: see tensor_codec.h's EncodeTensor.
absl::StatusOr<std::vector<WireTensor>> RunInfer(const models::Model& model,
                                                 const std::string& entry,
                                                 std::vector<WireTensor> inputs, bool typed_outputs,
                                                 const std::string& what);

}  // namespace metaload::cache

#endif  // METALOAD_SERVER_CACHE_INFER_CALL_H_
