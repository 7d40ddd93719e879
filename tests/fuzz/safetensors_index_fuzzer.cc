// libFuzzer target: model.safetensors.index.json documents.
#include <cstddef>
#include <cstdint>

#include "absl/strings/match.h"
#include "server/core/safetensors_index.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  absl::string_view text(reinterpret_cast<const char*>(data), size);
  auto map = metaload::core::ParseSafetensorsIndex(text, "fuzz.index.json");
  if (map.ok()) {
    for (const auto& [name, shard] : *map) {
      if (name.empty() || shard.empty() || absl::StrContains(shard, "/")) __builtin_trap();
    }
  } else if (!absl::IsDataLoss(map.status())) {
    __builtin_trap();
  }
  return 0;
}
