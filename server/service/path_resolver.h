// Resolves the `path` of a LoadModel request against the daemon's model roots, so a remote
// caller can only ever name files inside them.
//
// Relative paths are tried under each root in order; absolute paths must lie inside a root.
// Symlinks are resolved and the result must still lie inside a root. "..", NUL bytes, empty and
// over-long paths are refused outright. Errors are INVALID_ARGUMENT (outside the roots) or
// NOT_FOUND (inside, but missing), and never mention anything outside the roots.
// Immutable after construction; thread-safe.
#ifndef METALOAD_SERVER_SERVICE_PATH_RESOLVER_H_
#define METALOAD_SERVER_SERVICE_PATH_RESOLVER_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace metaload::service {

inline constexpr size_t kMaxRequestPathBytes = 4096;

class PathResolver {
 public:
  // `roots` must be canonical absolute directories.
  explicit PathResolver(std::vector<std::string> roots) : roots_(std::move(roots)) {}

  // The canonical absolute path of an existing file or directory inside a root.
  absl::StatusOr<std::string> Resolve(const std::string& request_path) const;

  // The default model_id for a request path: its last component without extension
  // ("sd/v1-5.safetensors" -> "v1-5").
  static std::string Stem(const std::string& request_path);

 private:
  bool InsideRoots(const std::string& canonical) const;
  std::vector<std::string> roots_;
};

}  // namespace metaload::service

#endif  // METALOAD_SERVER_SERVICE_PATH_RESOLVER_H_
