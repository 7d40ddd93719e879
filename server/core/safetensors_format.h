// The safetensors file format, as metaload reads and writes it.
//
//   [8 bytes]  N, little-endian uint64: length of the JSON header
//   [N bytes]  JSON object: { "NAME": {"dtype": "F32", "shape": [2, 3], "data_offsets": [b, e]},
//                             ..., "__metadata__": {"key": "value", ...} (optional) }
//              (writers pad it with trailing spaces to a multiple of 8)
//   [rest]     the data section; each tensor's bytes are [b, e) relative to its start,
//              little-endian, row-major, and the tensors cover the section exactly.
//
// This header holds only the dtype vocabulary shared by the reader and the writer; it depends on
// nothing but the standard library, so the parsers built on it can be fuzzed on their own.
#ifndef METALOAD_SERVER_CORE_SAFETENSORS_FORMAT_H_
#define METALOAD_SERVER_CORE_SAFETENSORS_FORMAT_H_

#include <cstdint>
#include <optional>
#include <string_view>

namespace metaload::core {

// Bytes per element of a safetensors dtype name ("F32" -> 4), or nullopt for an unknown name.
// Known: F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL.
std::optional<int> SafetensorsDtypeSize(std::string_view dtype);

// The safetensors dtype name for a metaload dtype name ("float32" -> "F32"), or nullopt.
std::optional<std::string_view> SafetensorsDtypeFromName(std::string_view name);

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_SAFETENSORS_FORMAT_H_
