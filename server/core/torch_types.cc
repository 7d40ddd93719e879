#include "server/core/torch_types.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"

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
  if (text.empty() || text == "cpu") return c10::Device(c10::kCPU);
  absl::string_view rest = text;
  if (!absl::ConsumePrefix(&rest, "cuda")) {
    return absl::InvalidArgumentError(
        absl::StrCat("device '", text, "': expected cpu, cuda or cuda:N"));
  }
  int index = 0;
  if (!rest.empty()) {
    if (!absl::ConsumePrefix(&rest, ":") || !absl::SimpleAtoi(rest, &index) || index < 0 ||
        index > 255) {
      return absl::InvalidArgumentError(
          absl::StrCat("device '", text, "': expected cpu, cuda or cuda:N"));
    }
  }
  if (!at::hasCUDA()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "device '", text, "': this metaload has no CUDA (CPU-only LibTorch or no GPU)"));
  }
  if (index >= static_cast<int>(at::getNumGPUs())) {
    return absl::FailedPreconditionError(
        absl::StrCat("device '", text, "': only ", at::getNumGPUs(), " CUDA device(s)"));
  }
  return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(index));
}

void SetIntraOpThreads(int threads) {
  if (threads > 0) at::set_num_threads(threads);
}

int IntraOpThreads() { return at::get_num_threads(); }

void InitIntraOpThreadsForThisThread() { at::init_num_threads(); }

bool CudaAvailable() { return at::hasCUDA() && at::getNumGPUs() > 0; }

}  // namespace metaload::core
