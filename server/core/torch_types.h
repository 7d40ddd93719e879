// Conversions between metaload's vocabulary (DType, device strings) and LibTorch's.
#ifndef METALOAD_SERVER_CORE_TORCH_TYPES_H_
#define METALOAD_SERVER_CORE_TORCH_TYPES_H_

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "server/core/dtype.h"

namespace metaload::core {

// The float8 types map to kByte, which maps back to uint8.
at::ScalarType ToScalarType(DType dtype);
std::optional<DType> FromScalarType(at::ScalarType type);

// "cpu" (also ""), "cuda", "cuda:N". INVALID_ARGUMENT for anything else; FAILED_PRECONDITION
// for CUDA when this build or machine has no CUDA device N.
absl::StatusOr<c10::Device> ParseDevice(const std::string& text);

// The dtype a network whose weights are stored as `storage` computes in on `device` when the
// request names none: on a CPU, float16 and bfloat16 storage computes in float32 (LibTorch's CPU
// kernels lack float16 matmul, and its bfloat16 kernels give results whose precision depends on
// the CPU's instruction set: several times worse without AVX-512 BF16 in convolutions and group
// norms); elsewhere, the storage dtype. float8 storage computes in float32 on a CPU and in
// float16 elsewhere (no kernel computes in float8; both formats are exact in float16).
at::ScalarType DefaultComputeDtype(DType storage, c10::Device device);

// Whether this LibTorch was built with CUDA and sees at least one device.
bool CudaAvailable();

// Threads one forward pass may use (LibTorch's intra-op pool); <= 0 keeps LibTorch's default.
void SetIntraOpThreads(int threads);
int IntraOpThreads();
// Applies that setting to the calling thread, which LibTorch does only for its own threads: a
// thread of ours that runs a forward pass would otherwise give OpenMP (and the BLAS built on it)
// every core, however many such threads run at once.
void InitIntraOpThreadsForThisThread();

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_TORCH_TYPES_H_
