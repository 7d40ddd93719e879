// Reads the central directory of a zip archive (as written by torch.save and torch.jit.save,
// ZIP64 included) to find where each entry's bytes lie in the file, without decompressing
// anything: metaload only reads "stored" (uncompressed) entries in place.
//
// Checked before anything is trusted: the end-of-central-directory record and its ZIP64
// variants, entry counts and sizes against the file size, every local header's signature and
// the entry's data range against the file. Failures are DATA_LOSS naming the file (and entry).
// Depends on nothing but Abseil, so it can be fuzzed. Stateless and thread-safe.
#ifndef METALOAD_SERVER_CORE_ZIP_DIRECTORY_H_
#define METALOAD_SERVER_CORE_ZIP_DIRECTORY_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace metaload::core {

struct ZipEntry {
  std::string name;
  uint16_t method = 0;       // 0 = stored; anything else is compressed
  uint64_t data_offset = 0;  // absolute offset of the entry's bytes
  uint64_t size = 0;         // compressed size (== uncompressed size when stored)
  uint64_t uncompressed_size = 0;
};

// Reads `length` bytes at `offset` into `out`; false when the file is shorter.
using ZipReadFn = std::function<bool(uint64_t offset, uint64_t length, std::string* out)>;

// Lists the entries of the archive of `file_size` bytes read through `read`.
absl::StatusOr<std::vector<ZipEntry>> ReadZipDirectory(const ZipReadFn& read, uint64_t file_size,
                                                       absl::string_view file);

// Convenience for a whole archive in memory (tests and fuzzing).
absl::StatusOr<std::vector<ZipEntry>> ReadZipDirectoryFromBytes(absl::string_view bytes,
                                                                absl::string_view file);

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_ZIP_DIRECTORY_H_
