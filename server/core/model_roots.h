// The model roots, and the one way a checkpoint's files are opened: so that nothing outside the
// roots is ever read, whatever a model directory holds (symlinks, FIFOs, devices) and however it
// changes while a load runs.
//
// OpenChecked(path) opens first and checks the *opened* file, never the name:
//   1. open(O_RDONLY | O_NONBLOCK | O_NOCTTY): a FIFO opens at once instead of waiting for a
//      writer, a terminal is not adopted;
//   2. fstat: anything but a regular file is FAILED_PRECONDITION "not a regular file";
//   3. with roots: the descriptor's real path (/proc/self/fd/N, every symlink resolved by the
//      kernel) must lie inside a root, else INVALID_ARGUMENT "resolves outside the model roots".
// The caller reads through that descriptor only, so renaming or re-linking the path after the
// check cannot redirect what is read. A hard link to an outside file is indistinguishable from
// a file (whoever made it could already read the file); the README's threat model says so.
// Messages name `path` as given, never where a link points.
//
// ModelRoots is immutable after construction; OpenChecked is thread-safe.
#ifndef METALOAD_SERVER_CORE_MODEL_ROOTS_H_
#define METALOAD_SERVER_CORE_MODEL_ROOTS_H_

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace metaload::core {

class ModelRoots {
 public:
  // No roots: every regular file may be opened (local tools such as `metaload inspect`).
  ModelRoots() = default;
  // `roots` must be canonical absolute directories (the daemon canonicalises --model_root).
  explicit ModelRoots(std::vector<std::string> roots) : roots_(std::move(roots)) {}

  bool restricted() const { return !roots_.empty(); }
  // `canonical` is the root itself or lies below one.
  bool Contains(absl::string_view canonical) const;

 private:
  std::vector<std::string> roots_;
};

// An open regular file; closes its descriptor on destruction. Move-only.
class CheckedFile {
 public:
  CheckedFile() = default;
  ~CheckedFile();
  CheckedFile(CheckedFile&& other) noexcept;
  CheckedFile& operator=(CheckedFile&& other) noexcept;
  CheckedFile(const CheckedFile&) = delete;
  CheckedFile& operator=(const CheckedFile&) = delete;

  int fd() const { return fd_; }
  // Gives up ownership of the descriptor.
  int release();
  uint64_t size = 0;
  int64_t mtime_ns = 0;
  dev_t device = 0;
  ino_t inode = 0;

 private:
  friend absl::StatusOr<CheckedFile> OpenChecked(const std::string& path, const ModelRoots& roots);
  int fd_ = -1;
};

// See the top of this file. NOT_FOUND for a missing path.
absl::StatusOr<CheckedFile> OpenChecked(const std::string& path, const ModelRoots& roots);

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_MODEL_ROOTS_H_
