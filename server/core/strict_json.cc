#include "server/core/strict_json.h"

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"

namespace metaload::core {

absl::StatusOr<simdjson::dom::element> StrictJsonParser::Parse(absl::string_view text,
                                                               size_t max_depth,
                                                               absl::string_view context,
                                                               bool padded) {
  if (parser_.max_depth() != max_depth || parser_.capacity() < text.size()) {
    if (parser_.allocate(std::max<size_t>(text.size(), 4096), max_depth) != simdjson::SUCCESS) {
      return absl::ResourceExhaustedError(absl::StrCat(context, ": cannot allocate a JSON parser"));
    }
  }
  simdjson::dom::element root;
  simdjson::error_code error =
      parser_.parse(text.data(), text.size(), /*realloc_if_needed=*/!padded).get(root);
  if (error == simdjson::DEPTH_ERROR) {
    return absl::DataLossError(absl::StrCat(context, ": nested deeper than allowed"));
  }
  if (error != simdjson::SUCCESS) {
    return absl::DataLossError(
        absl::StrCat(context, ": not valid JSON (", simdjson::error_message(error), ")"));
  }
  return root;
}

absl::Status CheckUniqueKeys(simdjson::dom::object object, absl::string_view context) {
  absl::flat_hash_set<std::string_view> seen;
  seen.reserve(object.size());
  for (simdjson::dom::key_value_pair field : object) {
    if (!seen.insert(field.key).second) {
      return absl::DataLossError(
          absl::StrCat(context, ": duplicate key '", ToAbsl(field.key), "'"));
    }
  }
  return absl::OkStatus();
}

}  // namespace metaload::core
