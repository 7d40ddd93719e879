// libFuzzer target: raw pickle programs through the restricted unpickler. Every value a parsed
// document reaches is read (text and items), and the arena must stay within its stated budget.
#include <cstddef>
#include <cstdint>
#include <unordered_set>
#include <vector>

#include "server/core/pickle_reader.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using metaload::core::PickleValue;
  absl::string_view bytes(reinterpret_cast<const char*>(data), size);
  auto doc = metaload::core::ParsePickle(bytes, "fuzz.pkl");
  if (!doc.ok()) {
    if (!absl::IsDataLoss(doc.status()) && !absl::IsResourceExhausted(doc.status())) {
      __builtin_trap();
    }
    return 0;
  }
  if ((*doc)->arena_bytes() >
      metaload::core::kPickleMemoryPerInputByte * size + metaload::core::kPickleMemoryBaseBytes) {
    __builtin_trap();
  }
  std::unordered_set<const PickleValue*> seen;
  std::vector<const PickleValue*> todo = {&(*doc)->root()};
  size_t text_bytes = 0;
  while (!todo.empty()) {
    const PickleValue* v = todo.back();
    todo.pop_back();
    if (v == nullptr || !seen.insert(v).second) continue;
    (void)v->TypeName();
    for (char c : v->text) text_bytes += static_cast<unsigned char>(c) != 0;
    for (const PickleValue* item : v->items) todo.push_back(item);
    todo.push_back(v->state);
  }
  return text_bytes == SIZE_MAX ? 1 : 0;
}
