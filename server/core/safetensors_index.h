// Reads `model.safetensors.index.json`, the key -> shard map of a sharded Hugging Face checkpoint:
//   {"metadata": {"total_size": 123, ...}, "weight_map": {"tensor.name":
//   "model-00001-of-00002.safetensors", ...}}
// Checked: valid JSON without duplicate keys; a top-level object whose weight_map is an object of
// string -> string; every shard a plain file name in the same directory (no '/', no '..').
// Whether the shards exist and hold those tensors is checked by the checkpoint that opens them.
// Uses nlohmann::json, not LibTorch, so it can be fuzzed. Stateless and thread-safe.
#ifndef METALOAD_SERVER_CORE_SAFETENSORS_INDEX_H_
#define METALOAD_SERVER_CORE_SAFETENSORS_INDEX_H_

#include <map>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace metaload::core {

// Largest index file read, in bytes (a 2,000-entry index is about 150 KB).
inline constexpr uint64_t kMaxSafetensorsIndexBytes = 64 << 20;

// tensor name -> shard file name. DATA_LOSS naming `file` (and the key) on any problem.
absl::StatusOr<std::map<std::string, std::string>> ParseSafetensorsIndex(absl::string_view json,
                                                                         absl::string_view file);

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_SAFETENSORS_INDEX_H_
