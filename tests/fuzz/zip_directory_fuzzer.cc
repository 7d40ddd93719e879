// libFuzzer target: torch.save / TorchScript zip archives, through the zip directory reader,
// the restricted unpickler and the state-dict interpretation.
#include <cstddef>
#include <cstdint>

#include "server/core/checkpoint.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  absl::string_view bytes(reinterpret_cast<const char*>(data), size);
  auto index = metaload::core::IndexTorchZipBytes(bytes, "fuzz.pt");
  if (index.ok()) {
    for (const auto& t : index->tensors) {
      // Every indexed tensor must lie inside the archive.
      if (t.offset > size || t.nbytes > size - t.offset) __builtin_trap();
    }
  } else if (!absl::IsDataLoss(index.status()) && !absl::IsFailedPrecondition(index.status())) {
    __builtin_trap();
  }
  return 0;
}
