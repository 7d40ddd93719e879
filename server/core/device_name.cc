#include "server/core/device_name.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"

namespace metaload::core {

absl::StatusOr<DeviceName> ParseDeviceName(absl::string_view text) {
  if (text.empty() || text == "cpu") return DeviceName{};
  absl::string_view rest = text;
  DeviceName out{/*cuda=*/true, 0};
  const bool ok =
      absl::ConsumePrefix(&rest, "cuda") &&
      (rest.empty() || (absl::ConsumePrefix(&rest, ":") && absl::SimpleAtoi(rest, &out.index) &&
                        out.index >= 0 && out.index <= 255));
  if (!ok) {
    return absl::InvalidArgumentError(
        absl::StrCat("device '", text, "': expected cpu, cuda or cuda:N"));
  }
  return out;
}

}  // namespace metaload::core
