#include "server/core/byte_size.h"

#include <cmath>
#include <fstream>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"

namespace metaload::core {

absl::StatusOr<int64_t> ParseByteSize(absl::string_view text) {
  absl::string_view t = absl::StripAsciiWhitespace(text);
  size_t split = 0;
  while (split < t.size() && (absl::ascii_isdigit(t[split]) || t[split] == '.')) ++split;
  double value = 0;
  if (split == 0 || !absl::SimpleAtod(t.substr(0, split), &value)) {
    return absl::InvalidArgumentError(absl::StrCat("'", text, "' is not a byte size"));
  }
  static const std::pair<absl::string_view, double> kUnits[] = {{"", 1},
                                                                {"B", 1},
                                                                {"K", 1024.0},
                                                                {"KiB", 1024.0},
                                                                {"KB", 1e3},
                                                                {"M", 1048576.0},
                                                                {"MiB", 1048576.0},
                                                                {"MB", 1e6},
                                                                {"G", 1073741824.0},
                                                                {"GiB", 1073741824.0},
                                                                {"GB", 1e9},
                                                                {"T", 1099511627776.0},
                                                                {"TiB", 1099511627776.0},
                                                                {"TB", 1e12}};
  const absl::string_view unit = absl::StripAsciiWhitespace(t.substr(split));
  for (const auto& [name, scale] : kUnits) {
    if (unit == name) {
      const double bytes = value * scale;
      if (!(bytes < 9.2e18))
        return absl::InvalidArgumentError(absl::StrCat("'", text, "' is too large"));
      return static_cast<int64_t>(std::llround(bytes));
    }
  }
  return absl::InvalidArgumentError(absl::StrCat("'", text, "': unknown unit '", unit, "'"));
}

absl::StatusOr<std::map<std::string, int64_t>> ParseMemoryBudgets(absl::string_view text) {
  std::map<std::string, int64_t> out;
  for (absl::string_view item : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    std::pair<absl::string_view, absl::string_view> kv =
        absl::StrSplit(item, absl::MaxSplits('=', 1));
    std::string device(absl::StripAsciiWhitespace(kv.first));
    if (device == "cuda") device = "cuda:0";
    int index = 0;
    if (device != "cpu" && !(device.rfind("cuda:", 0) == 0 &&
                             absl::SimpleAtoi(device.substr(5), &index) && index >= 0)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--memory_budget: '", kv.first, "' is not cpu, cuda or cuda:N"));
    }
    absl::StatusOr<int64_t> bytes = ParseByteSize(kv.second);
    if (!bytes.ok())
      return absl::InvalidArgumentError(
          absl::StrCat("--memory_budget: ", bytes.status().message()));
    if (*bytes <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("--memory_budget: ", device,
                                                     " has a budget of 0; a device that may hold "
                                                     "no model is simply left out"));
    }
    if (!out.emplace(device, *bytes).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("--memory_budget: ", device, " is given twice"));
    }
  }
  return out;
}

int64_t MemAvailableBytes() {
  std::ifstream in("/proc/meminfo");
  std::string key, unit;
  int64_t value = 0;
  while (in >> key >> value >> unit) {
    if (key == "MemAvailable:") return value * 1024;
  }
  return -1;
}

std::string HumanBytes(int64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (std::fabs(v) >= 1024 && u < 4) {
    v /= 1024;
    ++u;
  }
  return u == 0 ? absl::StrCat(bytes, " B") : absl::StrFormat("%.1f %s", v, units[u]);
}

}  // namespace metaload::core
