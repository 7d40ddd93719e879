#include "server/core/dtype.h"

namespace metaload::core {
namespace {

struct Row {
  DType dtype;
  absl::string_view name;
  absl::string_view safetensors;
  absl::string_view kserve;  // empty: not a KServe type
  int size;
  bool floating;
};

constexpr Row kRows[] = {
    {DType::kFloat64, "float64", "F64", "FP64", 8, true},
    {DType::kFloat32, "float32", "F32", "FP32", 4, true},
    {DType::kFloat16, "float16", "F16", "FP16", 2, true},
    {DType::kBFloat16, "bfloat16", "BF16", "BF16", 2, true},
    {DType::kInt64, "int64", "I64", "INT64", 8, false},
    {DType::kInt32, "int32", "I32", "INT32", 4, false},
    {DType::kInt16, "int16", "I16", "", 2, false},
    {DType::kInt8, "int8", "I8", "INT8", 1, false},
    {DType::kUInt8, "uint8", "U8", "UINT8", 1, false},
    {DType::kBool, "bool", "BOOL", "BOOL", 1, false},
    {DType::kFloat8E4M3, "float8_e4m3fn", "F8_E4M3", "", 1, true},
    {DType::kFloat8E5M2, "float8_e5m2", "F8_E5M2", "", 1, true},
};

const Row& RowOf(DType dtype) { return kRows[static_cast<int>(dtype)]; }

}  // namespace

int DTypeSize(DType dtype) { return RowOf(dtype).size; }
bool IsFloatingPoint(DType dtype) { return RowOf(dtype).floating; }
bool IsFloat8(DType dtype) { return dtype == DType::kFloat8E4M3 || dtype == DType::kFloat8E5M2; }
absl::string_view DTypeName(DType dtype) { return RowOf(dtype).name; }
absl::string_view SafetensorsName(DType dtype) { return RowOf(dtype).safetensors; }

std::optional<absl::string_view> KServeName(DType dtype) {
  if (RowOf(dtype).kserve.empty()) return std::nullopt;
  return RowOf(dtype).kserve;
}

std::optional<DType> DTypeFromName(absl::string_view name) {
  for (const Row& row : kRows) {
    if (row.name == name) return row.dtype;
  }
  return std::nullopt;
}

std::optional<DType> DTypeFromSafetensorsName(absl::string_view name) {
  for (const Row& row : kRows) {
    if (row.safetensors == name) return row.dtype;
  }
  return std::nullopt;
}

std::optional<DType> DTypeFromKServeName(absl::string_view name) {
  if (name.empty()) return std::nullopt;
  for (const Row& row : kRows) {
    if (row.kserve == name) return row.dtype;
  }
  return std::nullopt;
}

}  // namespace metaload::core
