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
};

inline constexpr DType kAllDTypes[] = {
    DType::kFloat64, DType::kFloat32, DType::kFloat16, DType::kBFloat16, DType::kInt64,
    DType::kInt32,   DType::kInt16,   DType::kInt8,    DType::kUInt8,    DType::kBool};

// Bytes per element.
int DTypeSize(DType dtype);
// Floating-point types are the only ones a dtype policy converts.
bool IsFloatingPoint(DType dtype);

// "float32", "bfloat16", "int64", "bool", ...
absl::string_view DTypeName(DType dtype);
std::optional<DType> DTypeFromName(absl::string_view name);

// "F32", "BF16", "I64", "BOOL", ...
absl::string_view SafetensorsName(DType dtype);
std::optional<DType> DTypeFromSafetensorsName(absl::string_view name);

// "FP32", "BF16", "INT64", "BOOL", ...; nullopt for types KServe does not name (int16).
std::optional<absl::string_view> KServeName(DType dtype);
std::optional<DType> DTypeFromKServeName(absl::string_view name);

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_DTYPE_H_
