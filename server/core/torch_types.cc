#include "server/core/torch_types.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "server/core/device_name.h"

namespace metaload::core {

at::ScalarType ToScalarType(DType dtype) {
  switch (dtype) {
    case DType::kFloat64:
      return at::kDouble;
    case DType::kFloat32:
      return at::kFloat;
    case DType::kFloat16:
      return at::kHalf;
    case DType::kBFloat16:
      return at::kBFloat16;
    case DType::kInt64:
      return at::kLong;
    case DType::kInt32:
      return at::kInt;
    case DType::kInt16:
      return at::kShort;
    case DType::kInt8:
      return at::kChar;
    case DType::kUInt8:
      return at::kByte;
    case DType::kBool:
      return at::kBool;
    case DType::kFloat8E4M3:
    case DType::kFloat8E5M2:
      return at::kByte;  // the bytes; a slot's float8 tag says how to read them (module.h)
  }
  return at::kFloat;
}

std::optional<DType> FromScalarType(at::ScalarType type) {
  for (DType d : kAllDTypes) {
    if (!IsFloat8(d) && ToScalarType(d) == type) return d;
  }
  return std::nullopt;
}

at::ScalarType DefaultComputeDtype(DType storage, c10::Device device) {
  if (device.is_cpu() &&
      (storage == DType::kFloat16 || storage == DType::kBFloat16 || IsFloat8(storage))) {
    return at::kFloat;
  }
  if (IsFloat8(storage)) return at::kHalf;
  return ToScalarType(storage);
}

absl::StatusOr<c10::Device> ParseDevice(const std::string& text) {
  absl::StatusOr<DeviceName> name = ParseDeviceName(text);
  if (!name.ok()) return name.status();
  if (!name->cuda) return c10::Device(c10::kCPU);
  if (!at::hasCUDA()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "device '", text, "': this metaload has no CUDA (CPU-only LibTorch or no GPU)"));
  }
  if (name->index >= static_cast<int>(at::getNumGPUs())) {
    return absl::FailedPreconditionError(
        absl::StrCat("device '", text, "': only ", at::getNumGPUs(), " CUDA device(s)"));
  }
  return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(name->index));
}

}  // namespace metaload::core
