#include "server/cache/wire_tensor.h"

#include "absl/strings/str_cat.h"

namespace metaload::cache {

absl::StatusOr<WireLayout> CheckWireTensor(const WireTensor& wire) {
  const std::string who = absl::StrCat("input '", wire.name, "'");
  std::optional<core::DType> dtype = core::DTypeFromKServeName(wire.datatype);
  if (!dtype) {
    return absl::InvalidArgumentError(
        absl::StrCat(who, ": unknown datatype '", wire.datatype,
                     "' (FP32 FP16 BF16 FP64 INT64 INT32 INT8 UINT8 BOOL)"));
  }
  if (wire.shape.size() > 16)
    return absl::InvalidArgumentError(absl::StrCat(who, ": rank above 16"));
  WireLayout layout;
  layout.dtype = *dtype;
  layout.numel = 1;
  for (int64_t d : wire.shape) {
    if (d < 0) return absl::InvalidArgumentError(absl::StrCat(who, ": negative dimension ", d));
    if (__builtin_mul_overflow(layout.numel, d, &layout.numel)) {
      return absl::InvalidArgumentError(absl::StrCat(who, ": shape product overflows"));
    }
  }
  if (__builtin_mul_overflow(layout.numel, static_cast<int64_t>(core::DTypeSize(*dtype)),
                             &layout.nbytes) ||
      layout.nbytes > kMaxWireTensorBytes) {
    return absl::InvalidArgumentError(absl::StrCat(who, ": tensor too large"));
  }
  const int fields =
      !wire.raw_data.empty() + !wire.fp32_contents.empty() + !wire.int64_contents.empty();
  if (fields > 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(who, ": set raw_data or one typed *_contents field, not several"));
  }
  if (!wire.fp32_contents.empty()) {
    if (*dtype != core::DType::kFloat32) {
      return absl::InvalidArgumentError(absl::StrCat(who, ": fp32_contents needs datatype FP32"));
    }
    if (static_cast<int64_t>(wire.fp32_contents.size()) != layout.numel) {
      return absl::InvalidArgumentError(absl::StrCat(who, ": ", wire.fp32_contents.size(),
                                                     " fp32_contents for a shape of ", layout.numel,
                                                     " elements"));
    }
    layout.field = WireLayout::Field::kFp32;
    return layout;
  }
  if (!wire.int64_contents.empty()) {
    if (*dtype != core::DType::kInt64) {
      return absl::InvalidArgumentError(absl::StrCat(who, ": int64_contents needs datatype INT64"));
    }
    if (static_cast<int64_t>(wire.int64_contents.size()) != layout.numel) {
      return absl::InvalidArgumentError(absl::StrCat(who, ": ", wire.int64_contents.size(),
                                                     " int64_contents for a shape of ",
                                                     layout.numel, " elements"));
    }
    layout.field = WireLayout::Field::kInt64;
    return layout;
  }
  if (static_cast<int64_t>(wire.raw_data.size()) != layout.nbytes) {
    return absl::InvalidArgumentError(absl::StrCat(who, ": raw_data has ", wire.raw_data.size(),
                                                   " bytes, shape x datatype needs ",
                                                   layout.nbytes));
  }
  layout.field = layout.nbytes > 0 ? WireLayout::Field::kRaw : WireLayout::Field::kNone;
  return layout;
}

}  // namespace metaload::cache
