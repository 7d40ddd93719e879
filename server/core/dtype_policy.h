// Which dtype each checkpoint tensor is loaded as: the web UI's weight_dtype_conversion, done
// right. A default ("" = keep the file's) plus per-prefix overrides (a dtype name or "keep");
// the longest matching prefix wins (the seed matched the first path component only). Integer
// and bool tensors are never converted. LibTorch-free; immutable and thread-safe once created.
//
// float8 (float8_e4m3fn, float8_e5m2) is a storage format only Module::Weight() decodes, so
// whether a tensor may hold it depends on how the model reads the tensor (TensorUse): a float8
// rule converts the weights of matmuls and convolutions, and other tensors read through Weight()
// (norm scales, biases, embedding tables) only when the rule's prefix is the tensor's own name;
// the rest stay as they are. A tensor the model reads directly is never float8: stored so in the
// file, it loads as float16, which holds every float8 value exactly.
#ifndef METALOAD_SERVER_CORE_DTYPE_POLICY_H_
#define METALOAD_SERVER_CORE_DTYPE_POLICY_H_

#include <map>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/core/checkpoint.h"
#include "server/core/dtype.h"

namespace metaload::core {

// How a model reads a tensor (see above).
enum class TensorUse : uint8_t {
  kDirect,        // as stored: buffers, tensors a layer computes with itself
  kWeight,        // through Module::Weight(): norm scales, biases, embedding tables
  kMatmulWeight,  // a matmul's or a convolution's weight, through Module::Weight()
};

// A storage dtype as a request names it: "" or "keep" (nullopt: the file's), or the name of a
// floating dtype (dtype.h's table is the one list). INVALID_ARGUMENT naming `what` and the
// valid names otherwise.
absl::StatusOr<std::optional<DType>> ParseStorageDtype(absl::string_view text,
                                                       absl::string_view what);

class DtypePolicy {
 public:
  // `default_dtype`: "" or "keep" (the file's), "float32", "float16", "bfloat16",
  // "float8_e4m3fn", "float8_e5m2" (also "float64"). (Architectures give "" their own meaning
  // first: models::EffectiveDtypes.) `overrides`: key prefix -> one of those names or "keep".
  // INVALID_ARGUMENT naming the bad value otherwise. `keep_float8`: tensors stored as float8
  // stay float8 whatever the rules say (an architecture's default policy, so that a float8
  // checkpoint loads as float8 unless the request asks otherwise).
  static absl::StatusOr<DtypePolicy> Create(absl::string_view default_dtype,
                                            const std::map<std::string, std::string>& overrides,
                                            bool keep_float8 = false);
  // A load request's dtypes, parsed once: nullopt when it names neither a dtype nor an override
  // (the architecture's default policy then applies: models::EffectivePolicy), else Create's
  // policy ("keep" is explicit: the file's dtypes). INVALID_ARGUMENT as Create.
  static absl::StatusOr<std::optional<DtypePolicy>> FromRequest(
      absl::string_view dtype, const std::map<std::string, std::string>& overrides);

  DtypePolicy() = default;  // keeps every tensor's stored dtype

  // The dtype tensor `name`, stored as `stored` and read as `use`, is loaded as.
  DType Resolve(absl::string_view name, DType stored, TensorUse use) const;

  // A stable description for cache keys: "default=float16;a.=keep;b.=bfloat16".
  std::string Describe() const;
  // What ModelInfo.dtype says: "keep" or the dtype's name when no prefix has a rule of its own,
  // else Describe().
  std::string Summary() const;

  // The default rule (nullopt: keep) and whether any prefix has its own.
  std::optional<DType> default_dtype() const { return default_; }
  bool has_overrides() const { return !overrides_.empty(); }

 private:
  std::optional<DType> default_;                           // nullopt: keep
  std::map<std::string, std::optional<DType>> overrides_;  // nullopt: keep
  bool keep_float8_ = false;
};

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_DTYPE_POLICY_H_
