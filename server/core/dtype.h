// The element types metaload reads, converts and serves, with their names in each vocabulary:
// metaload/torch ("float32"), safetensors ("F32") and KServe ("FP32").
// Depends on nothing but Abseil, so the format parsers built on it can be fuzzed on their own.
#ifndef METALOAD_SERVER_CORE_DTYPE_H_
#define METALOAD_SERVER_CORE_DTYPE_H_

#include <cstdint>
#include <optional>

#include "absl/strings/string_view.h"

namespace metaload::core {

enum class DType : uint8_t {
  kFloat64,
  kFloat32,
  kFloat16,
  kBFloat16,
  kInt64,
  kInt32,
  kInt16,
  kInt8,
  kUInt8,
  kBool,
  // OCP 8-bit floats (float8.h), held as bytes: LibTorch 1.13 has no float8 type.
  kFloat8E4M3,
  kFloat8E5M2,
};

inline constexpr DType kAllDTypes[] = {DType::kFloat64,  DType::kFloat32,    DType::kFloat16,
                                       DType::kBFloat16, DType::kInt64,      DType::kInt32,
                                       DType::kInt16,    DType::kInt8,       DType::kUInt8,
                                       DType::kBool,     DType::kFloat8E4M3, DType::kFloat8E5M2};

// Bytes per element.
int DTypeSize(DType dtype);
// Floating-point types are the only ones a dtype policy converts.
bool IsFloatingPoint(DType dtype);
// float8_e4m3fn and float8_e5m2: stored one byte per value and computed in a wider dtype.
bool IsFloat8(DType dtype);

// "float32", "bfloat16", "int64", "bool", "float8_e4m3fn" (PyTorch's names), ...
absl::string_view DTypeName(DType dtype);
std::optional<DType> DTypeFromName(absl::string_view name);

// "F32", "BF16", "I64", "BOOL", "F8_E4M3", ...
absl::string_view SafetensorsName(DType dtype);
std::optional<DType> DTypeFromSafetensorsName(absl::string_view name);

// "FP32", "BF16", "INT64", "BOOL", ...; nullopt for types KServe does not name (int16, the
// float8 types).
std::optional<absl::string_view> KServeName(DType dtype);
std::optional<DType> DTypeFromKServeName(absl::string_view name);

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_DTYPE_H_
