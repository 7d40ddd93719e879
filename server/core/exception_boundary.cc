#include "server/core/exception_boundary.h"

#include <c10/util/Exception.h>

#include <exception>
#include <new>
#include <string>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace metaload::core {
namespace {

constexpr size_t kMaxWhatBytes = 300;

std::string FirstLine(absl::string_view what) {
  what = what.substr(0, what.find('\n'));
  if (what.size() > kMaxWhatBytes) return absl::StrCat(what.substr(0, kMaxWhatBytes), "...");
  return std::string(what);
}

}  // namespace

absl::Status CurrentExceptionToStatus(absl::string_view context, absl::StatusCode code) {
  try {
    throw;
  } catch (const c10::OutOfMemoryError& e) {
    return absl::ResourceExhaustedError(
        absl::StrCat(context, ": out of memory: ", FirstLine(e.what_without_backtrace())));
  } catch (const c10::Error& e) {
    const std::string what = FirstLine(e.what_without_backtrace());
    // LibTorch 1.13's CPU allocator reports a failed allocation as a plain c10::Error.
    if (absl::StrContains(what, "can't allocate memory") ||
        absl::StrContains(what, "not enough memory")) {
      return absl::ResourceExhaustedError(absl::StrCat(context, ": out of memory: ", what));
    }
    return absl::Status(code, absl::StrCat(context, ": ", what));
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(absl::StrCat(context, ": out of memory"));
  } catch (const std::exception& e) {
    return absl::Status(code, absl::StrCat(context, ": ", FirstLine(e.what())));
  } catch (...) {
    return absl::InternalError(absl::StrCat(context, ": an exception that is no std::exception"));
  }
}

}  // namespace metaload::core
