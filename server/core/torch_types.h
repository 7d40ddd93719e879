// Conversions between metaload's vocabulary (DType, device strings) and LibTorch's.
#ifndef METALOAD_SERVER_CORE_TORCH_TYPES_H_
#define METALOAD_SERVER_CORE_TORCH_TYPES_H_

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "server/core/dtype.h"
#include "server/core/torch_runtime.h"  // the process-wide settings, LibTorch-free

namespace metaload::core {

// The float8 types map to kByte, which maps back to uint8.
at::ScalarType ToScalarType(DType dtype);
std::optional<DType> FromScalarType(at::ScalarType type);

// "cpu" (also ""), "cuda", "cuda:N" (device_name.h). INVALID_ARGUMENT for anything else;
// FAILED_PRECONDITION for CUDA when this build or machine has no CUDA device N.
absl::StatusOr<c10::Device> ParseDevice(const std::string& text);

// The dtype a network whose weights are stored as `storage` computes in on `device` when the
// request names none: on a CPU, float16 and bfloat16 storage computes in float32 (LibTorch's CPU
// kernels lack float16 matmul, and its bfloat16 kernels give results whose precision depends on
// the CPU's instruction set: several times worse without AVX-512 BF16 in convolutions and group
// norms); elsewhere, the storage dtype. float8 storage computes in float32 on a CPU and in
// float16 elsewhere (no kernel computes in float8; both formats are exact in float16).
at::ScalarType DefaultComputeDtype(DType storage, c10::Device device);

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_TORCH_TYPES_H_
