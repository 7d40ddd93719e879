#include "server/core/safetensors_index.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "server/core/strict_json.h"

namespace metaload::core {

absl::StatusOr<std::map<std::string, std::string>> ParseSafetensorsIndex(absl::string_view text,
                                                                         absl::string_view file) {
  const std::string context = absl::StrCat(file, ": safetensors index");
  // Metadata may carry small nested values; nothing legitimate nests deeper than this.
  absl::StatusOr<nlohmann::json> parsed = ParseStrictJson(text, /*max_depth=*/4, context);
  if (!parsed.ok()) return parsed.status();
  const nlohmann::json& root = *parsed;
  if (!root.is_object()) return absl::DataLossError(absl::StrCat(context, ": not a JSON object"));
  auto weight_map = root.find("weight_map");
  if (weight_map == root.end()) {
    return absl::DataLossError(absl::StrCat(context, ": missing weight_map"));
  }
  if (!weight_map->is_object()) {
    return absl::DataLossError(absl::StrCat(context, ": weight_map is not an object"));
  }
  std::map<std::string, std::string> out;
  for (auto it = weight_map->begin(); it != weight_map->end(); ++it) {
    if (it.key().empty()) {
      return absl::DataLossError(absl::StrCat(context, ": weight_map has an empty tensor name"));
    }
    if (!it.value().is_string()) {
      return absl::DataLossError(
          absl::StrCat(context, ": weight_map entry '", it.key(), "' is not a file name"));
    }
    const std::string& shard = it.value().get_ref<const std::string&>();
    if (shard.empty() || shard == "." || shard == ".." || absl::StrContains(shard, "/") ||
        absl::StrContains(shard, std::string(1, '\0'))) {
      return absl::DataLossError(absl::StrCat(context, ": weight_map entry '", it.key(),
                                              "' names '", shard,
                                              "', not a file in the checkpoint's directory"));
    }
    out[it.key()] = shard;
  }
  return out;
}

}  // namespace metaload::core
