#include "server/core/strict_json.h"

#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"

namespace metaload::core {
namespace {

// Thrown from the parser callback to stop at the first problem; caught below.
struct StrictJsonError {
  std::string message;
};

}  // namespace

absl::StatusOr<nlohmann::json> ParseStrictJson(absl::string_view text, int max_depth,
                                               absl::string_view context) {
  using json = nlohmann::json;
  std::vector<std::set<std::string>> keys;
  auto callback = [&keys, max_depth](int depth, json::parse_event_t event, json& parsed) -> bool {
    switch (event) {
      case json::parse_event_t::object_start:
      case json::parse_event_t::array_start:
        if (depth > max_depth) throw StrictJsonError{"nested deeper than allowed"};
        if (event == json::parse_event_t::object_start) keys.emplace_back();
        break;
      case json::parse_event_t::object_end:
        if (!keys.empty()) keys.pop_back();
        break;
      case json::parse_event_t::key: {
        const std::string& key = parsed.get_ref<const std::string&>();
        if (!keys.back().insert(key).second) {
          throw StrictJsonError{absl::StrCat("duplicate key '", key, "'")};
        }
        break;
      }
      default:
        break;
    }
    return true;
  };
  try {
    return json::parse(text.begin(), text.end(), callback, /*allow_exceptions=*/true,
                       /*ignore_comments=*/false);
  } catch (const StrictJsonError& e) {
    return absl::DataLossError(absl::StrCat(context, ": ", e.message));
  } catch (const json::exception& e) {
    return absl::DataLossError(absl::StrCat(context, ": not valid JSON (", e.what(), ")"));
  }
}

}  // namespace metaload::core
