// A tensor as it travels in metaload.v1.Tensor, without protobuf or LibTorch types, so the gRPC
// layer and the torch layer meet on plain data (and never in one translation unit).
#ifndef METALOAD_SERVER_CACHE_WIRE_TENSOR_H_
#define METALOAD_SERVER_CACHE_WIRE_TENSOR_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/core/dtype.h"

namespace metaload::cache {

// Largest tensor accepted in a request (also bounded by the gRPC message size).
inline constexpr int64_t kMaxWireTensorBytes = int64_t{1} << 32;

struct WireTensor {
  std::string name;
  std::string datatype;  // KServe: FP32 FP16 BF16 FP64 INT64 INT32 INT8 UINT8 BOOL
  std::vector<int64_t> shape;
  std::string raw_data;  // little-endian, row-major
  std::vector<float> fp32_contents;
  std::vector<int64_t> int64_contents;
};

// What a checked WireTensor holds: its type, element and byte counts, and which field has the
// values (kNone only for an empty tensor).
struct WireLayout {
  enum class Field { kNone, kRaw, kFp32, kInt64 };
  core::DType dtype = core::DType::kFloat32;
  int64_t numel = 0;
  int64_t nbytes = 0;
  Field field = Field::kNone;
};

// Checks everything a remote caller controls before anything is allocated: a known datatype,
// rank at most 16, non-negative dimensions whose product and byte size fit (and stay under
// kMaxWireTensorBytes), at most one of raw_data or a typed field, the typed field matching the
// datatype, and a byte or element count equal to what the shape needs. INVALID_ARGUMENT naming
// the tensor otherwise.
absl::StatusOr<WireLayout> CheckWireTensor(const WireTensor& wire);

}  // namespace metaload::cache

#endif  // METALOAD_SERVER_CACHE_WIRE_TENSOR_H_
