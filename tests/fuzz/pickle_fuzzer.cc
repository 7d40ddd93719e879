// libFuzzer target: raw pickle programs through the restricted unpickler.
#include <cstddef>
#include <cstdint>

#include "server/core/pickle_reader.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  absl::string_view bytes(reinterpret_cast<const char*>(data), size);
  auto doc = metaload::core::ParsePickle(bytes, "fuzz.pkl");
  if (doc.ok()) {
    (void)(*doc)->root().TypeName();
  } else if (!absl::IsDataLoss(doc.status())) {
    __builtin_trap();
  }
  return 0;
}
