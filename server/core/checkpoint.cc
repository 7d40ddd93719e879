// CheckpointSource: a checkpoint's opened files (indexed by checkpoint_format.cc), read with
// threaded preads or mapped.
#include "server/core/checkpoint.h"

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "server/core/checkpoint_formats.h"
#include "server/core/file_io.h"

namespace metaload::core {

MappedFile::~MappedFile() {
  if (data_ != nullptr) ::munmap(const_cast<void*>(data_), size_);
}

namespace {

// Options::overlay_path merged into `index`, its descriptors appended to *fds.
absl::Status AddOverlay(const CheckpointSource::Options& options, CheckpointIndex* index,
                        std::vector<int>* fds) {
  const std::string& prefix = options.overlay_prefix;
  if (index->format == CheckpointFormat::kTorchScript) {
    return absl::FailedPreconditionError(absl::StrCat(
        index->path, ": a TorchScript archive takes no ", prefix, " from another file"));
  }
  // The overlay's descriptors, closed here unless handed to *fds (which the caller closes).
  std::vector<int> overlay_fds;
  struct CloseUnlessKept {
    std::vector<int>* fds;
    ~CloseUnlessKept() {
      for (int fd : *fds) ::close(fd);
    }
  } close_unless_kept{&overlay_fds};
  absl::StatusOr<CheckpointIndex> overlay =
      IndexCheckpoint(options.overlay_path, ModelRoots(options.roots), &overlay_fds);
  fds->reserve(fds->size() + overlay_fds.size());
  fds->insert(fds->end(), overlay_fds.begin(), overlay_fds.end());  // cannot throw: reserved
  overlay_fds.clear();
  if (!overlay.ok()) return overlay.status();
  if (overlay->format != CheckpointFormat::kSafetensors &&
      overlay->format != CheckpointFormat::kTorchZip) {
    return absl::FailedPreconditionError(absl::StrCat(
        options.overlay_path, ": supplies ", prefix,
        " only as one .safetensors or .ckpt file, not ", CheckpointFormatName(overlay->format)));
  }
  const bool prefixed =
      std::any_of(overlay->tensors.begin(), overlay->tensors.end(),
                  [&](const TensorInfo& t) { return absl::StartsWith(t.name, prefix); });
  std::vector<TensorInfo> tensors;
  for (TensorInfo& t : index->tensors) {
    if (!absl::StartsWith(t.name, prefix)) tensors.push_back(std::move(t));
  }
  const int first_file = static_cast<int>(index->files.size());
  size_t taken = 0;
  for (TensorInfo& t : overlay->tensors) {
    if (prefixed && !absl::StartsWith(t.name, prefix)) continue;
    if (!prefixed) t.name = prefix + t.name;
    t.file += first_file;
    tensors.push_back(std::move(t));
    ++taken;
  }
  if (taken == 0) {
    return absl::FailedPreconditionError(
        absl::StrCat(options.overlay_path, ": no tensors to take for ", prefix));
  }
  index->tensors = std::move(tensors);
  index->by_name.clear();
  for (size_t i = 0; i < index->tensors.size(); ++i) index->by_name[index->tensors[i].name] = i;
  index->files.insert(index->files.end(), overlay->files.begin(), overlay->files.end());
  index->overlay_path = options.overlay_path;
  index->overlay_files = overlay->files.size();
  return absl::OkStatus();
}

}  // namespace

CheckpointSource::CheckpointSource(CheckpointIndex index, Options options)
    : index_(std::move(index)), options_(options), maps_(index_.files.size()) {}

CheckpointSource::~CheckpointSource() {
  for (int fd : fds_) ::close(fd);
}

absl::StatusOr<std::unique_ptr<CheckpointSource>> CheckpointSource::Open(const std::string& path,
                                                                         Options options) {
  // Descriptors of the indexed files, in index order: read from until the source goes, so the
  // files checked are the files read. Closed here if the index fails.
  std::vector<int> fds;
  struct CloseUnlessKept {
    std::vector<int>* fds;
    ~CloseUnlessKept() {
      if (fds != nullptr)
        for (int fd : *fds) ::close(fd);
    }
  } close_unless_kept{&fds};
  absl::StatusOr<CheckpointIndex> index = IndexCheckpoint(path, ModelRoots(options.roots), &fds);
  if (!index.ok()) return index.status();
  if (!options.overlay_path.empty()) {
    if (absl::Status s = AddOverlay(options, &*index, &fds); !s.ok()) return s;
  }
  std::unique_ptr<CheckpointSource> source(new CheckpointSource(*std::move(index), options));
  source->fds_ = std::move(fds);
  close_unless_kept.fds = nullptr;
  return source;
}

absl::Status CheckpointSource::Read(const TensorInfo& tensor, uint64_t begin, uint64_t n,
                                    void* dst) const {
  if (begin > tensor.nbytes || n > tensor.nbytes - begin) {
    return absl::InternalError(absl::StrCat("read past the end of tensor '", tensor.name, "'"));
  }
  const int fd = fds_[static_cast<size_t>(tensor.file)];
  const std::string& path = index_.files[static_cast<size_t>(tensor.file)].path;
  auto read_range = [fd](char* out, uint64_t offset, uint64_t count) {
    return PreadFully(fd, out, count, offset);
  };
  char* out = static_cast<char*>(dst);
  const uint64_t file_offset = tensor.offset + begin;
  int threads = options_.read_threads;
  if (n < options_.parallel_read_min_bytes || threads < 2) threads = 1;
  std::vector<int> results(static_cast<size_t>(threads), 0);
  if (threads == 1) {
    results[0] = read_range(out, file_offset, n);
  } else {
    // Contiguous slices, 2 MiB aligned, so each thread first-touches its own part of dst.
    const uint64_t slice = ((n / threads) + (2 << 20) - 1) & ~uint64_t{(2 << 20) - 1};
    std::vector<std::thread> workers;
    for (int i = 0; i < threads; ++i) {
      const uint64_t start = std::min<uint64_t>(n, slice * static_cast<uint64_t>(i));
      const uint64_t end = i == threads - 1 ? n : std::min<uint64_t>(n, start + slice);
      workers.emplace_back([&, i, start, end] {
        results[static_cast<size_t>(i)] = read_range(out + start, file_offset + start, end - start);
      });
    }
    for (std::thread& w : workers) w.join();
  }
  for (int r : results) {
    if (r == kEndOfFile) {
      return absl::DataLossError(absl::StrCat(path, ": tensor '", tensor.name,
                                              "': file ended early (truncated or rewritten?)"));
    }
    if (r != 0) {
      return absl::DataLossError(
          absl::StrCat(path, ": tensor '", tensor.name, "': read failed: ", std::strerror(r)));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<const MappedFile>> CheckpointSource::Map(int file) const {
  MutexLock lock(&map_mu_);
  std::shared_ptr<const MappedFile>& slot = maps_[static_cast<size_t>(file)];
  if (slot != nullptr) return slot;
  const CheckpointFile& f = index_.files[static_cast<size_t>(file)];
  if (f.size == 0) {
    slot = std::make_shared<MappedFile>(nullptr, 0);
    return slot;
  }
  void* data = ::mmap(nullptr, f.size, PROT_READ, MAP_PRIVATE, fds_[static_cast<size_t>(file)], 0);
  if (data == MAP_FAILED) {
    return absl::ResourceExhaustedError(absl::StrCat(f.path, ": mmap: ", std::strerror(errno)));
  }
  ::madvise(data, f.size, MADV_SEQUENTIAL);
  slot = std::make_shared<MappedFile>(data, f.size);
  return slot;
}

void CheckpointSource::Release(const TensorInfo& tensor) const {
  std::shared_ptr<const MappedFile> map;
  {
    MutexLock lock(&map_mu_);
    map = maps_[static_cast<size_t>(tensor.file)];
  }
  if (map == nullptr || map->size() == 0 || tensor.nbytes == 0) return;
  static const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  uint64_t begin = tensor.offset & ~(page - 1);
  uint64_t end = std::min<uint64_t>(map->size(), tensor.offset + tensor.nbytes);
  ::madvise(const_cast<char*>(map->data()) + begin, end - begin, MADV_DONTNEED);
}

absl::Status CheckpointSource::CheckUnchanged() const {
  // fstat on the descriptors the bytes came from: a file replaced by rename left this load's
  // bytes intact, one truncated or rewritten in place did not.
  for (size_t i = 0; i < index_.files.size(); ++i) {
    const CheckpointFile& f = index_.files[i];
    struct stat st;
    if (::fstat(fds_[i], &st) != 0) {
      return absl::DataLossError(absl::StrCat(f.path, ": ", std::strerror(errno)));
    }
    const int64_t mtime_ns =
        static_cast<int64_t>(st.st_mtim.tv_sec) * 1'000'000'000 + st.st_mtim.tv_nsec;
    if (static_cast<uint64_t>(st.st_size) != f.size || mtime_ns != f.mtime_ns) {
      return absl::DataLossError(
          absl::StrCat(f.path, ": changed on disk while it was being loaded (size ", f.size, " -> ",
                       st.st_size, "); load it again once it is written"));
    }
  }
  return absl::OkStatus();
}

}  // namespace metaload::core
