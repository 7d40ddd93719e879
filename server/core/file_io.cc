#include "server/core/file_io.h"

#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace metaload::core {

int PreadFully(int fd, void* dst, uint64_t n, uint64_t offset) {
  char* out = static_cast<char*>(dst);
  while (n > 0) {
    const ssize_t r = ::pread(fd, out, n, static_cast<off_t>(offset));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return errno;
    if (r == 0) return kEndOfFile;
    out += r;
    offset += static_cast<uint64_t>(r);
    n -= static_cast<uint64_t>(r);
  }
  return 0;
}

int WriteFully(int fd, const void* src, uint64_t n) {
  const char* in = static_cast<const char*>(src);
  while (n > 0) {
    const ssize_t w = ::write(fd, in, n);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) return errno;
    if (w == 0) return ENOSPC;
    in += w;
    n -= static_cast<uint64_t>(w);
  }
  return 0;
}

std::string IoErrorMessage(int error) {
  if (error == kEndOfFile) return "file ended early";
  return std::strerror(error);
}

}  // namespace metaload::core
