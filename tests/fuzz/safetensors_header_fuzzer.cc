// libFuzzer target: whole safetensors files (length prefix + header) through the validator.
#include <cstddef>
#include <cstdint>

#include "server/core/safetensors_header.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  absl::string_view bytes(reinterpret_cast<const char*>(data), size);
  absl::StatusOr<metaload::core::SafetensorsHeader> h =
      metaload::core::ParseSafetensorsBytes(bytes, "fuzz.safetensors");
  if (h.ok()) {
    // A header that passes must describe exactly the data section it came with.
    uint64_t covered = 0;
    for (const auto& t : h->tensors) covered += t.end - t.begin;
    if (covered != h->data_bytes || h->data_offset + h->data_bytes != size) __builtin_trap();
  } else if (!absl::IsDataLoss(h.status())) {
    __builtin_trap();  // corrupt input must be DATA_LOSS, never anything else
  }
  return 0;
}
