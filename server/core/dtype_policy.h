// Which dtype each checkpoint tensor is loaded as: the web UI's weight_dtype_conversion, done
// right. A default ("" = keep the file's) plus per-prefix overrides (a dtype name or "keep");
// the longest matching prefix wins (the seed matched the first path component only). Integer
// and bool tensors are never converted. LibTorch-free; immutable and thread-safe once created.
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

class DtypePolicy {
 public:
  // `default_dtype`: "" or "keep" (the file's), "float32", "float16", "bfloat16" (also
  // "float64"). (Architectures give "" their own meaning first: models::EffectiveDtypes.)
  // `overrides`: key prefix -> one of those names or "keep". INVALID_ARGUMENT naming the bad
  // value otherwise.
  static absl::StatusOr<DtypePolicy> Create(absl::string_view default_dtype,
                                            const std::map<std::string, std::string>& overrides);
  DtypePolicy() = default;

  // The dtype tensor `name`, stored as `stored`, is loaded as.
  DType Resolve(absl::string_view name, DType stored) const;

  // Exact bytes the tensors of `index` occupy once loaded under this policy (admission control
  // needs them before allocating anything).
  uint64_t LoadedBytes(const CheckpointIndex& index) const;

  // A stable description for cache keys: "default=float16;a.=keep;b.=bfloat16".
  std::string Describe() const;

 private:
  std::optional<DType> default_;                           // nullopt: keep
  std::map<std::string, std::optional<DType>> overrides_;  // nullopt: keep
};

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_DTYPE_POLICY_H_
