#include "server/core/dtype_policy.h"

#include <algorithm>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace metaload::core {
namespace {

// "float64, float32, ..., float8_e5m2 or keep": every name ParseStorageDtype accepts.
std::string StorageDtypeNames() {
  std::string out;
  for (DType d : kAllDTypes) {
    if (IsFloatingPoint(d)) absl::StrAppend(&out, DTypeName(d), ", ");
  }
  return absl::StrCat(out, "or keep");
}

}  // namespace

absl::StatusOr<std::optional<DType>> ParseStorageDtype(absl::string_view text,
                                                       absl::string_view what) {
  if (text.empty() || text == "keep") return std::optional<DType>();
  std::optional<DType> d = DTypeFromName(text);
  if (!d || !IsFloatingPoint(*d)) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": unknown dtype '", text, "' (", StorageDtypeNames(), ")"));
  }
  return d;
}

absl::StatusOr<DtypePolicy> DtypePolicy::Create(absl::string_view default_dtype,
                                                const std::map<std::string, std::string>& overrides,
                                                bool keep_float8) {
  DtypePolicy policy;
  policy.keep_float8_ = keep_float8;
  absl::StatusOr<std::optional<DType>> d = ParseStorageDtype(default_dtype, "dtype");
  if (!d.ok()) return d.status();
  policy.default_ = *d;
  for (const auto& [prefix, target] : overrides) {
    absl::StatusOr<std::optional<DType>> o =
        ParseStorageDtype(target, absl::StrCat("dtype_overrides['", prefix, "']"));
    if (!o.ok()) return o.status();
    if (target.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("dtype_overrides['", prefix, "']: empty; use a dtype or keep"));
    }
    policy.overrides_[prefix] = *o;
  }
  return policy;
}

absl::StatusOr<std::optional<DtypePolicy>> DtypePolicy::FromRequest(
    absl::string_view dtype, const std::map<std::string, std::string>& overrides) {
  if (dtype.empty() && overrides.empty()) return std::optional<DtypePolicy>();
  absl::StatusOr<DtypePolicy> policy = Create(dtype, overrides);
  if (!policy.ok()) return policy.status();
  return std::optional<DtypePolicy>(*std::move(policy));
}

DType DtypePolicy::Resolve(absl::string_view name, DType stored, TensorUse use) const {
  if (!IsFloatingPoint(stored)) return stored;
  const std::optional<DType>* best = &default_;
  size_t best_length = 0;
  bool matched = false;
  for (const auto& [prefix, target] : overrides_) {
    if (absl::StartsWith(name, prefix) && (!matched || prefix.size() > best_length)) {
      best = &target;
      best_length = prefix.size();
      matched = true;
    }
  }
  DType target = best->has_value() && !(keep_float8_ && IsFloat8(stored)) ? **best : stored;
  if (IsFloat8(target) && target != stored) {
    const bool named = matched && best_length == name.size();
    if (use == TensorUse::kDirect || (use == TensorUse::kWeight && !named)) target = stored;
  }
  if (IsFloat8(target) && use == TensorUse::kDirect) return DType::kFloat16;  // exact
  return target;
}

std::string DtypePolicy::Describe() const {
  std::string out = absl::StrCat("default=", default_ ? DTypeName(*default_) : "keep");
  for (const auto& [prefix, target] : overrides_) {
    absl::StrAppend(&out, ";", prefix, "=", target ? DTypeName(*target) : "keep");
  }
  if (keep_float8_) absl::StrAppend(&out, ";float8=keep");
  return out;
}

std::string DtypePolicy::Summary() const {
  if (!overrides_.empty()) return Describe();
  return default_ ? std::string(DTypeName(*default_)) : "keep";
}

}  // namespace metaload::core
