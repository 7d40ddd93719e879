#include "server/core/model_roots.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace metaload::core {

bool ModelRoots::Contains(absl::string_view canonical) const {
  for (const std::string& root : roots_) {
    if (canonical == root) return true;
    if (absl::StartsWith(canonical, root) && canonical.size() > root.size() &&
        (root.back() == '/' || canonical[root.size()] == '/')) {
      return true;
    }
  }
  return false;
}

CheckedFile::~CheckedFile() {
  if (fd_ >= 0) ::close(fd_);
}

CheckedFile::CheckedFile(CheckedFile&& other) noexcept { *this = std::move(other); }

CheckedFile& CheckedFile::operator=(CheckedFile&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = other.fd_;
    other.fd_ = -1;
    size = other.size;
    mtime_ns = other.mtime_ns;
    device = other.device;
    inode = other.inode;
  }
  return *this;
}

int CheckedFile::release() {
  const int fd = fd_;
  fd_ = -1;
  return fd;
}

absl::StatusOr<CheckedFile> OpenChecked(const std::string& path, const ModelRoots& roots) {
  CheckedFile file;
  file.fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  if (file.fd_ < 0) {
    if (errno == ENOENT || errno == ENOTDIR) {
      return absl::NotFoundError(absl::StrCat(path, ": no such file"));
    }
    if (errno == ELOOP) {
      return absl::FailedPreconditionError(absl::StrCat(path, ": too many levels of symlinks"));
    }
    return absl::FailedPreconditionError(absl::StrCat(path, ": ", std::strerror(errno)));
  }
  struct stat st;
  if (::fstat(file.fd_, &st) != 0) {
    return absl::FailedPreconditionError(absl::StrCat(path, ": ", std::strerror(errno)));
  }
  if (!S_ISREG(st.st_mode)) {
    return absl::FailedPreconditionError(
        absl::StrCat(path, ": not a regular file (a FIFO, socket, device or directory)"));
  }
  if (roots.restricted()) {
    // Where the descriptor really is, every symlink resolved by the kernel at open time.
    char real[4096];
    const std::string link = absl::StrCat("/proc/self/fd/", file.fd_);
    const ssize_t n = ::readlink(link.c_str(), real, sizeof(real) - 1);
    if (n <= 0 || n >= static_cast<ssize_t>(sizeof(real) - 1)) {
      return absl::FailedPreconditionError(
          absl::StrCat(path, ": cannot tell where the file lies (is /proc mounted?)"));
    }
    const absl::string_view resolved(real, static_cast<size_t>(n));
    if (resolved.empty() || resolved[0] != '/' || absl::EndsWith(resolved, " (deleted)") ||
        !roots.Contains(resolved)) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": resolves outside the model roots (symlink)"));
    }
  }
  // Reads of a regular file never block; clear the flag anyway so the descriptor is ordinary.
  ::fcntl(file.fd_, F_SETFL, ::fcntl(file.fd_, F_GETFL) & ~O_NONBLOCK);
  file.size = static_cast<uint64_t>(st.st_size);
  file.mtime_ns = static_cast<int64_t>(st.st_mtim.tv_sec) * 1'000'000'000 + st.st_mtim.tv_nsec;
  file.device = st.st_dev;
  file.inode = st.st_ino;
  return file;
}

}  // namespace metaload::core
