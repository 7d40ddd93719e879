// JSON parsing for untrusted checkpoint headers and indexes: nlohmann::json plus what it does not
// check by itself: duplicate keys at any level (nlohmann keeps the last one silently) and a
// nesting limit, both enforced while parsing, before a deep or repetitive document is built.
// Stateless and thread-safe.
#ifndef METALOAD_SERVER_CORE_STRICT_JSON_H_
#define METALOAD_SERVER_CORE_STRICT_JSON_H_

#include <nlohmann/json.hpp>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace metaload::core {

// DATA_LOSS "<context>: <what>" for invalid JSON, a duplicate key, or objects/arrays nested
// deeper than `max_depth` (the top-level value is depth 0, its children depth 1, ...).
absl::StatusOr<nlohmann::json> ParseStrictJson(absl::string_view text, int max_depth,
                                               absl::string_view context);

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_STRICT_JSON_H_
