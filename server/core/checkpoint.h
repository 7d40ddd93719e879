// A checkpoint on disk, opened for loading: the index of its tensors (name, dtype, shape, file,
// byte range), known from headers alone without reading tensor data, and the ways to bring a
// tensor's bytes to a destination (threaded pread, or a shared read-only mapping).
//
// Formats (detected from the path, never from its name alone):
//   - a safetensors file;
//   - a Hugging Face directory: config.json plus model.safetensors, or
//     model.safetensors.index.json and its shards (every shard validated; a key in two shards, or
//     a weight_map entry naming a missing file or tensor, is DATA_LOSS);
//   - a torch.save zip (.pt/.bin/.ckpt) holding a state dict, read by metaload's own restricted
//     unpickler (nothing is executed; a nested "state_dict" is unwrapped; non-tensor entries are
//     skipped and listed in skipped_entries); also pytorch_model.bin inside a directory;
//   - a TorchScript archive: recognised (format kTorchScript, no tensors indexed), for
//     torch::jit::load.
// The legacy (non-zip) torch.save format is FAILED_PRECONDITION with how to convert it.
//
// Errors: NOT_FOUND for a missing path, DATA_LOSS for a corrupt or truncated file (naming file and
// tensor), FAILED_PRECONDITION for something valid that metaload cannot use.
//
// Every file is opened once, through OpenChecked (model_roots.h): a regular file (a FIFO or
// device is refused at once), inside Options::roots once every symlink is resolved
// (INVALID_ARGUMENT naming it), and then read only through that descriptor, so nothing swapped in
// after the check is read. Shard names that leave the directory are DATA_LOSS. Messages never
// quote bytes of a file that is not (yet) a valid checkpoint.
//
// Thread-safety: index() is immutable after Open; Read, Map and Release may be called from many
// threads at once.
#ifndef METALOAD_SERVER_CORE_CHECKPOINT_H_
#define METALOAD_SERVER_CORE_CHECKPOINT_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "server/core/dtype.h"
#include "server/core/mutex.h"

namespace metaload::core {

enum class CheckpointFormat { kSafetensors, kSafetensorsSharded, kTorchZip, kTorchScript };

// "safetensors", "safetensors-sharded", "torch-zip", "torchscript".
absl::string_view CheckpointFormatName(CheckpointFormat format);

struct TensorInfo {
  std::string name;
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  int file = 0;         // index into CheckpointIndex::files
  uint64_t offset = 0;  // absolute offset of the first byte in that file
  uint64_t nbytes = 0;  // numel * DTypeSize(dtype); row-major, little-endian

  int64_t numel() const;
};

struct CheckpointFile {
  std::string path;
  uint64_t size = 0;
  int64_t mtime_ns = 0;
  // The file that was checked and read (st_dev, st_ino); 0 when unknown (bytes in memory).
  uint64_t device = 0;
  uint64_t inode = 0;
};

struct CheckpointIndex {
  CheckpointFormat format = CheckpointFormat::kSafetensors;
  std::string path;                       // what was opened: a file or a directory
  std::vector<CheckpointFile> files;      // the files holding tensor data
  std::vector<TensorInfo> tensors;        // ordered by (file, offset)
  std::map<std::string, size_t> by_name;  // tensor name -> position in `tensors`
  std::map<std::string, std::string> metadata;
  std::string config_json;                   // a directory's config.json text; empty otherwise
  std::vector<std::string> skipped_entries;  // torch.save entries that are not tensors
  // With CheckpointSource::Options::overlay_path: that checkpoint's path, and how many of the
  // last `files` are its (the checkpoint's own files come first; its hash leaves them out).
  std::string overlay_path;
  size_t overlay_files = 0;

  const TensorInfo* Find(absl::string_view name) const;
  uint64_t total_bytes() const;
  std::map<DType, uint64_t> bytes_by_dtype() const;
  int64_t parameter_count() const;
};

// A read-only shared mapping of one whole file; unmapped when the last reference goes.
class MappedFile {
 public:
  MappedFile(const void* data, size_t size) : data_(data), size_(size) {}
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const char* data() const { return static_cast<const char*>(data_); }
  size_t size() const { return size_; }

 private:
  const void* data_;
  size_t size_;
};

class CheckpointSource {
 public:
  struct Options {
    // Threads one Read() of a large range is split across (first-touch of the destination
    // dominates on CPU, see the README's loader notes).
    int read_threads = 2;
    // Reads shorter than this stay on the calling thread.
    uint64_t parallel_read_min_bytes = 32 << 20;
    // Canonical absolute directories every opened file must lie in, symlinks resolved. Empty:
    // no restriction (local tools); the daemon passes its --model_root directories.
    std::vector<std::string> roots;
    // A second checkpoint whose tensors take the place of every tensor under `overlay_prefix`
    // (Stable Diffusion's VAE from its own file: "first_stage_model."). When some of its keys
    // start with the prefix, those are taken and the rest ignored; otherwise every key is taken
    // with the prefix put in front. Opened under the same roots; its errors name its path, and a
    // file with nothing to take is FAILED_PRECONDITION naming it.
    std::string overlay_path;
    std::string overlay_prefix;
  };

  static absl::StatusOr<std::unique_ptr<CheckpointSource>> Open(const std::string& path,
                                                                Options options);
  static absl::StatusOr<std::unique_ptr<CheckpointSource>> Open(const std::string& path) {
    return Open(path, Options());
  }
  ~CheckpointSource();

  const CheckpointIndex& index() const { return index_; }

  // Copies bytes [begin, begin + n) of `tensor` into dst. DATA_LOSS naming file and tensor when
  // the file is shorter than its index said (truncated or rewritten while loading).
  absl::Status Read(const TensorInfo& tensor, uint64_t begin, uint64_t n, void* dst) const;

  // The whole of file `file` mapped read-only (MADV_SEQUENTIAL), made on first use.
  absl::StatusOr<std::shared_ptr<const MappedFile>> Map(int file) const;

  // Drops this process's mapped pages of the tensor's bytes (MADV_DONTNEED); the page cache keeps
  // them for the next load. A no-op when the file is not mapped.
  void Release(const TensorInfo& tensor) const;

  // DATA_LOSS naming the file when a file's size or mtime changed since it was indexed.
  absl::Status CheckUnchanged() const;

 private:
  CheckpointSource(CheckpointIndex index, Options options);

  CheckpointIndex index_;
  Options options_;
  std::vector<int> fds_;  // one per index_.files, opened and checked while indexing
  mutable Mutex map_mu_;
  mutable std::vector<std::shared_ptr<const MappedFile>> maps_ ABSL_GUARDED_BY(map_mu_);
};

// The torch.save / TorchScript zip indexer (checkpoint_torch_zip.cc), on a file or on bytes in
// memory (tests and fuzzing; `name` stands for the path in messages).
absl::StatusOr<CheckpointIndex> IndexTorchZip(const std::string& path);
// The same on an open descriptor of `file` (the caller keeps it open and owns it).
absl::StatusOr<CheckpointIndex> IndexTorchZipFd(int fd, const CheckpointFile& file);
absl::StatusOr<CheckpointIndex> IndexTorchZipBytes(absl::string_view bytes,
                                                   const std::string& name);

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_CHECKPOINT_H_
