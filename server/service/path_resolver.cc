#include "server/service/path_resolver.h"

#include <filesystem>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace metaload::service {

namespace fs = std::filesystem;

bool PathResolver::InsideRoots(const std::string& canonical) const {
  for (const std::string& root : roots_) {
    if (canonical == root || absl::StartsWith(canonical, root + "/")) return true;
  }
  return false;
}

absl::StatusOr<std::string> PathResolver::Resolve(const std::string& path) const {
  if (path.empty()) return absl::InvalidArgumentError("path is empty");
  if (path.size() > kMaxRequestPathBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat("path is longer than ", kMaxRequestPathBytes, " bytes"));
  }
  if (path.find('\0') != std::string::npos)
    return absl::InvalidArgumentError("path contains a NUL byte");
  for (absl::string_view part : absl::StrSplit(path, '/')) {
    if (part == "..") {
      return absl::InvalidArgumentError(absl::StrCat("path '", path, "' may not contain '..'"));
    }
  }
  if (roots_.empty()) {
    return absl::InvalidArgumentError(
        "the daemon serves no model roots (start it with --model_root)");
  }
  std::vector<std::string> candidates;
  if (path[0] == '/') {
    candidates.push_back(path);
  } else {
    for (const std::string& root : roots_) candidates.push_back(root + "/" + path);
  }
  bool lexically_inside = false;
  for (const std::string& candidate : candidates) {
    const std::string normal = fs::path(candidate).lexically_normal().string();
    std::string trimmed =
        normal.size() > 1 && normal.back() == '/' ? normal.substr(0, normal.size() - 1) : normal;
    if (!InsideRoots(trimmed)) continue;
    lexically_inside = true;
    std::error_code ec;
    const fs::path canonical = fs::canonical(trimmed, ec);
    if (ec) continue;  // missing under this root; try the next
    if (!InsideRoots(canonical.string())) {
      return absl::InvalidArgumentError(
          absl::StrCat("path '", path, "' resolves outside the model roots (symlink)"));
    }
    return canonical.string();
  }
  if (!lexically_inside) {
    return absl::InvalidArgumentError(absl::StrCat("path '", path, "' is outside the model roots"));
  }
  return absl::NotFoundError(
      absl::StrCat("path '", path, "' does not exist under the model roots"));
}

std::string PathResolver::Stem(const std::string& path) {
  std::string p = path;
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  std::string name = fs::path(p).filename().string();
  const size_t dot = name.rfind('.');
  if (dot != std::string::npos && dot > 0) name = name.substr(0, dot);
  return name.empty() ? "model" : name;
}

}  // namespace metaload::service
