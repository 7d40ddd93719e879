// sha256 of a checkpoint's bytes, as the web UI shows it (sha256sum of the file; for a sharded
// checkpoint, of its shard files concatenated in index order), remembered by (path, size, mtime)
// so a file is hashed once, ever.
//
// Hashing reads the whole checkpoint, so callers run Compute() in the background after a load,
// never on its critical path. With Options::state_dir set, results persist in
// state_dir/checksums.json (written atomically); when that cannot be written (disk full,
// read-only), the hash is still returned and kept in memory, and the failure is logged once per
// call as a warning: hashes are a convenience, never a reason to fail a load.
//
// Thread-safe.
#ifndef METALOAD_SERVER_CORE_CHECKSUM_STORE_H_
#define METALOAD_SERVER_CORE_CHECKSUM_STORE_H_

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/core/checkpoint.h"
#include "server/core/mutex.h"

namespace metaload::core {

class ChecksumStore {
 public:
  struct Options {
    // Directory for checksums.json; created if missing. Empty: remember in memory only.
    std::string state_dir;
  };

  static absl::StatusOr<std::unique_ptr<ChecksumStore>> Create(Options options);

  // The remembered hex sha256 of exactly these files (same paths, sizes and mtimes), if any.
  std::optional<std::string> Lookup(const std::vector<CheckpointFile>& files) const;

  // Reads the files, hashes them, remembers and persists the result. CANCELLED when *cancel
  // becomes true; DATA_LOSS naming the file when a file is shorter than recorded.
  absl::StatusOr<std::string> Compute(const std::vector<CheckpointFile>& files,
                                      const std::atomic<bool>* cancel = nullptr);

  // The first 10 hex digits, as the web UI shows them.
  static std::string ShortHash(const std::string& sha256) { return sha256.substr(0, 10); }

 private:
  explicit ChecksumStore(Options options) : options_(std::move(options)) {}
  static std::string Key(const std::vector<CheckpointFile>& files);
  void Load();
  void Persist() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  Options options_;
  mutable Mutex mu_;
  std::map<std::string, std::string> hashes_ ABSL_GUARDED_BY(mu_);
};

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_CHECKSUM_STORE_H_
