// Reads and validates the header of a safetensors file.
//
// The format:
//   [8 bytes]  N, little-endian uint64: length of the JSON header
//   [N bytes]  a JSON object: { "NAME": {"dtype": "F32", "shape": [2, 3], "data_offsets": [b, e]},
//              ..., "__metadata__": {"key": "value", ...} (optional, string -> string) }
//              (writers pad it with trailing spaces to a multiple of 8)
//   [rest]     the data section; tensor NAME's bytes are [b, e) relative to its start,
//              little-endian and row-major
//
// Everything is checked before a caller allocates a byte for tensor data, and every failure is
// DATA_LOSS with the file (and tensor, where there is one) in the message:
//   N > 100,000,000 or N > file size - 8; header not valid JSON or not an object; duplicate keys
//   at any level; an entry that is not an object, lacks dtype/shape/data_offsets or has other
//   fields; an unknown dtype; a shape that is not an array of non-negative integers, or whose
//   element count or byte size overflows int64; data_offsets that are not two integers
//   0 <= b <= e; e - b != numel x itemsize; offsets past the data section; tensors that overlap or
//   leave gaps (the data section must be covered exactly, as the reference implementation
//   requires); __metadata__ that is not an object of strings. The length prefix is never quoted
//   in a message: in a file that is no safetensors file, those 8 bytes may be anything.
//
// Memory: one parse peaks below kSafetensorsHeaderMemoryPerByte (8) x N + 8 MiB, the N bytes read
// included (measured for 300,000 one-element tensors: 5.2 x N read from disk, 6.2 x N from memory;
// SafetensorsHeaderMemoryTest). simdjson's parser lives for that one parse, so when it returns
// only the SafetensorsHeader (names, shapes, offsets) is left, and after a failure nothing. With
// N at most 100,000,000, a parse needs at most 800 MB, once per load thread at a time.
//
// Uses simdjson (strict_json.h), not LibTorch, so it can be fuzzed on its own. Stateless and
// thread-safe.
#ifndef METALOAD_SERVER_CORE_SAFETENSORS_HEADER_H_
#define METALOAD_SERVER_CORE_SAFETENSORS_HEADER_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/core/dtype.h"

namespace metaload::core {

inline constexpr uint64_t kMaxSafetensorsHeaderBytes = 100'000'000;
// A parse's peak memory is at most this many bytes per header byte, plus a few MiB (see above).
inline constexpr int64_t kSafetensorsHeaderMemoryPerByte = 8;

struct SafetensorsEntry {
  std::string name;
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  // Relative to the start of the data section; end - begin == numel * DTypeSize(dtype).
  uint64_t begin = 0;
  uint64_t end = 0;
};

struct SafetensorsHeader {
  uint64_t header_bytes = 0;              // N
  uint64_t data_offset = 0;               // 8 + N: where the data section starts in the file
  uint64_t data_bytes = 0;                // size of the data section
  std::vector<SafetensorsEntry> tensors;  // sorted by begin
  std::map<std::string, std::string> metadata;
};

// Validates `json`, the N header bytes, against a data section of `data_bytes` bytes.
// `file` names the file in error messages.
absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(absl::string_view json,
                                                         uint64_t data_bytes,
                                                         absl::string_view file);

// Validates a whole file held in memory (the fuzzing entry point, and handy in tests).
absl::StatusOr<SafetensorsHeader> ParseSafetensorsBytes(absl::string_view bytes,
                                                        absl::string_view file);

// Reads the header of the file at `path` (8 + N bytes, nothing else) and validates it against the
// file's size. NOT_FOUND when the file does not exist.
absl::StatusOr<SafetensorsHeader> ReadSafetensorsHeader(const std::string& path);
// The same on an open descriptor of a `size`-byte file; `path` names it in messages.
absl::StatusOr<SafetensorsHeader> ReadSafetensorsHeader(int fd, uint64_t size,
                                                        const std::string& path);

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_SAFETENSORS_HEADER_H_
