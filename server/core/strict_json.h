// JSON parsing for untrusted checkpoint headers and indexes, on simdjson (a 1 MB header of
// 10,000 tensors validates in about a millisecond; nlohmann::json needed 30). Adds what a DOM
// parser does not check: duplicate keys (CheckUniqueKeys) and a nesting limit, enforced by the
// parser before a deep document is built. UTF-8 is validated by simdjson.
//
// A StrictJsonParser holds one document's buffers: simdjson's structural index (4 bytes per
// structural character), tape (8 bytes per value, 16 per number) and unescaped strings. Keep it
// for one document and let it go: kept across documents (in a thread_local, say), it holds
// ~6 bytes per byte of the largest header it has parsed, for the thread's life. Not
// thread-safe. Elements it returns are valid until its next Parse or its destruction.
#ifndef METALOAD_SERVER_CORE_STRICT_JSON_H_
#define METALOAD_SERVER_CORE_STRICT_JSON_H_

#include <simdjson.h>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace metaload::core {

class StrictJsonParser {
 public:
  // DATA_LOSS "<context>: <what>" for invalid JSON (UTF-8 included) or nesting deeper than
  // `max_depth` levels (a bare object is 1 level, an array inside it 2, ...).
  // `padded`: SIMDJSON_PADDING readable bytes follow `text` (else simdjson copies it first).
  absl::StatusOr<simdjson::dom::element> Parse(absl::string_view text, size_t max_depth,
                                               absl::string_view context, bool padded = false);

 private:
  simdjson::dom::parser parser_;
};

// DATA_LOSS "<context>: duplicate key 'K'" when `object` holds a key twice.
absl::Status CheckUniqueKeys(simdjson::dom::object object, absl::string_view context);

inline absl::string_view ToAbsl(std::string_view s) {
  return absl::string_view(s.data(), s.size());
}

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_STRICT_JSON_H_
