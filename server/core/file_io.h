// The few file operations every reader in server/core shares, written once: a pread that
// finishes (EINTR retried, short reads continued), a write that finishes, and the message for an
// errno. Opening a checkpoint's files is OpenChecked's job (model_roots.h), not this file's.
//
// LibTorch-free and thread-safe (no state).
#ifndef METALOAD_SERVER_CORE_FILE_IO_H_
#define METALOAD_SERVER_CORE_FILE_IO_H_

#include <cstdint>
#include <string>

namespace metaload::core {

// What PreadFully and WriteFully return besides an errno.
constexpr int kEndOfFile = -1;

// Reads exactly n bytes at `offset` into dst. 0 when done, kEndOfFile when the file ends first
// (shorter than an index said: truncated or rewritten), else the errno of the failed read.
int PreadFully(int fd, void* dst, uint64_t n, uint64_t offset);

// Writes all n bytes of src. 0 when done, else the errno (ENOSPC for a write of zero bytes).
int WriteFully(int fd, const void* src, uint64_t n);

// strerror's text for a PreadFully/WriteFully result or an errno; "file ended early" for
// kEndOfFile.
std::string IoErrorMessage(int error);

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_FILE_IO_H_
