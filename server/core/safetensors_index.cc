#include "server/core/safetensors_index.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "server/core/strict_json.h"

namespace metaload::core {

absl::StatusOr<std::map<std::string, std::string>> ParseSafetensorsIndex(absl::string_view text,
                                                                         absl::string_view file) {
  const std::string context = absl::StrCat(file, ": safetensors index");
  // Metadata may carry small nested values; nothing legitimate nests deeper than this.
  // One parser per call, freed on return: a thread_local one kept its buffers (about 4 bytes
  // per input byte) for the thread's life.
  StrictJsonParser parser;
  absl::StatusOr<simdjson::dom::element> parsed = parser.Parse(text, /*max_depth=*/6, context);
  if (!parsed.ok()) return parsed.status();
  simdjson::dom::object root;
  if (parsed->get_object().get(root) != simdjson::SUCCESS) {
    return absl::DataLossError(absl::StrCat(context, ": not a JSON object"));
  }
  absl::Status unique = CheckUniqueKeys(root, context);
  if (!unique.ok()) return unique;
  simdjson::dom::element weight_map_element;
  if (root.at_key("weight_map").get(weight_map_element) != simdjson::SUCCESS) {
    return absl::DataLossError(absl::StrCat(context, ": missing weight_map"));
  }
  simdjson::dom::object weight_map;
  if (weight_map_element.get_object().get(weight_map) != simdjson::SUCCESS) {
    return absl::DataLossError(absl::StrCat(context, ": weight_map is not an object"));
  }
  unique = CheckUniqueKeys(weight_map, context);
  if (!unique.ok()) return unique;
  std::map<std::string, std::string> out;
  for (simdjson::dom::key_value_pair field : weight_map) {
    const absl::string_view name = ToAbsl(field.key);
    if (name.empty()) {
      return absl::DataLossError(absl::StrCat(context, ": weight_map has an empty tensor name"));
    }
    std::string_view shard_view;
    if (field.value.get_string().get(shard_view) != simdjson::SUCCESS) {
      return absl::DataLossError(
          absl::StrCat(context, ": weight_map entry '", name, "' is not a file name"));
    }
    const std::string shard(shard_view);
    if (shard.empty() || shard == "." || shard == ".." || absl::StrContains(shard, "/") ||
        absl::StrContains(shard, absl::string_view("\0", 1))) {
      return absl::DataLossError(absl::StrCat(context, ": weight_map entry '", name, "' names '",
                                              shard,
                                              "', not a file in the checkpoint's directory"));
    }
    out.emplace(std::string(name), shard);
  }
  return out;
}

}  // namespace metaload::core
