#include "server/core/safetensors_format.h"

namespace metaload::core {
namespace {

struct DtypeRow {
  std::string_view safetensors;
  std::string_view name;  // metaload / torch name
  int size;
};

constexpr DtypeRow kDtypes[] = {
    {"F64", "float64", 8}, {"F32", "float32", 4}, {"F16", "float16", 2}, {"BF16", "bfloat16", 2},
    {"I64", "int64", 8},   {"I32", "int32", 4},   {"I16", "int16", 2},   {"I8", "int8", 1},
    {"U8", "uint8", 1},    {"BOOL", "bool", 1},
};

}  // namespace

std::optional<int> SafetensorsDtypeSize(std::string_view dtype) {
  for (const DtypeRow& row : kDtypes) {
    if (row.safetensors == dtype) return row.size;
  }
  return std::nullopt;
}

std::optional<std::string_view> SafetensorsDtypeFromName(std::string_view name) {
  for (const DtypeRow& row : kDtypes) {
    if (row.name == name) return row.safetensors;
  }
  return std::nullopt;
}

}  // namespace metaload::core
