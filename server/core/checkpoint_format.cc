// What a path is and which reader indexes it (checkpoint_formats.h lists the readers); the
// CheckpointIndex queries.
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "server/core/checkpoint_formats.h"
#include "server/core/file_io.h"

namespace metaload::core {
namespace {

constexpr uint64_t kMaxConfigBytes = 16 << 20;
constexpr char kLegacyTorchMagic[] = "\x80\x02\x8a\x0a";

// Something is there (a file, a FIFO, a dangling symlink is not); OpenChecked says what.
bool Exists(const std::string& path) {
  struct stat st;
  return ::lstat(path.c_str(), &st) == 0;
}

absl::StatusOr<CheckpointIndex> IndexFile(const std::string& path, const ModelRoots& roots,
                                          std::vector<int>* fds) {
  absl::StatusOr<CheckedFile> file = OpenChecked(path, roots);
  if (!file.ok()) return file.status();
  char magic[4] = {0, 0, 0, 0};
  ssize_t n = ::pread(file->fd(), magic, sizeof(magic), 0);
  if (n == 4 && std::memcmp(magic, "PK\x03\x04", 4) == 0) {
    const CheckpointFile described = DescribeFile(path, *file);
    absl::StatusOr<CheckpointIndex> index = IndexTorchZipFd(file->fd(), described);
    if (index.ok()) fds->push_back(file->release());
    return index;
  }
  if (n == 4 && std::memcmp(magic, kLegacyTorchMagic, 4) == 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        path,
        ": legacy (pre-1.6, non-zip) torch.save format, which metaload does not read; convert it "
        "once with: python3 -c \"import torch; torch.save(torch.load('IN', map_location='cpu'), "
        "'OUT.pt')\" (or save it as safetensors)"));
  }
  return IndexSafetensors(path, *std::move(file), fds);
}

// A Hugging Face directory: config.json (kept as text for detection) and the weights, sharded
// safetensors first.
absl::StatusOr<CheckpointIndex> IndexDirectory(const std::string& path, const ModelRoots& roots,
                                               std::vector<int>* fds) {
  std::string config;
  if (Exists(path + "/config.json")) {
    absl::StatusOr<std::string> text = ReadSmallFile(path + "/config.json", kMaxConfigBytes, roots);
    if (!text.ok()) return text.status();
    config = *std::move(text);
  }
  absl::StatusOr<CheckpointIndex> index = absl::InternalError("unset");
  if (Exists(path + "/model.safetensors.index.json")) {
    index = IndexShardedSafetensors(path, path + "/model.safetensors.index.json", roots, fds);
  } else if (Exists(path + "/model.safetensors")) {
    const std::string file = path + "/model.safetensors";
    absl::StatusOr<CheckedFile> opened = OpenChecked(file, roots);
    if (!opened.ok()) return opened.status();
    index = IndexSafetensors(file, *std::move(opened), fds);
  } else if (Exists(path + "/pytorch_model.bin")) {
    const std::string file = path + "/pytorch_model.bin";
    absl::StatusOr<CheckedFile> opened = OpenChecked(file, roots);
    if (!opened.ok()) return opened.status();
    index = IndexTorchZipFd(opened->fd(), DescribeFile(file, *opened));
    if (index.ok()) fds->push_back(opened->release());
  } else {
    return absl::FailedPreconditionError(
        absl::StrCat(path,
                     ": directory holds no model.safetensors, "
                     "model.safetensors.index.json or pytorch_model.bin"));
  }
  if (index.ok()) {
    index->path = path;
    index->config_json = std::move(config);
  }
  return index;
}

}  // namespace

CheckpointFile DescribeFile(const std::string& path, const CheckedFile& f) {
  CheckpointFile out;
  out.path = path;
  out.size = f.size;
  out.mtime_ns = f.mtime_ns;
  out.device = static_cast<uint64_t>(f.device);
  out.inode = static_cast<uint64_t>(f.inode);
  return out;
}

absl::StatusOr<std::string> ReadSmallFile(const std::string& path, uint64_t limit,
                                          const ModelRoots& roots) {
  absl::StatusOr<CheckedFile> f = OpenChecked(path, roots);
  if (!f.ok()) return f.status();
  if (f->size > limit) {
    return absl::DataLossError(absl::StrCat(path, ": larger than ", limit, " bytes"));
  }
  std::string out(f->size, '\0');
  if (const int error = PreadFully(f->fd(), out.data(), f->size, 0); error != 0) {
    return absl::DataLossError(absl::StrCat(path, ": ", IoErrorMessage(error)));
  }
  return out;
}

absl::StatusOr<CheckpointIndex> IndexCheckpoint(const std::string& path, const ModelRoots& roots,
                                                std::vector<int>* fds) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT || errno == ENOTDIR) {
      return absl::NotFoundError(absl::StrCat(path, ": no such file or directory"));
    }
    return absl::FailedPreconditionError(absl::StrCat(path, ": ", std::strerror(errno)));
  }
  absl::StatusOr<CheckpointIndex> index = absl::InternalError("unset");
  if (S_ISDIR(st.st_mode)) {
    index = IndexDirectory(path, roots, fds);
  } else if (S_ISREG(st.st_mode)) {
    index = IndexFile(path, roots, fds);
  } else {
    return absl::FailedPreconditionError(
        absl::StrCat(path, ": not a regular file or directory (a FIFO, socket or device)"));
  }
  if (!index.ok()) return index.status();
  std::stable_sort(index->tensors.begin(), index->tensors.end(),
                   [](const TensorInfo& a, const TensorInfo& b) {
                     return a.file != b.file ? a.file < b.file : a.offset < b.offset;
                   });
  for (size_t i = 0; i < index->tensors.size(); ++i) {
    if (!index->by_name.emplace(index->tensors[i].name, i).second) {
      return absl::DataLossError(
          absl::StrCat(path, ": tensor '", index->tensors[i].name, "' appears twice"));
    }
  }
  if (fds->size() != index->files.size()) {
    return absl::InternalError(
        absl::StrCat(path, ": ", index->files.size(), " files but ", fds->size(), " descriptors"));
  }
  return index;
}

absl::string_view CheckpointFormatName(CheckpointFormat format) {
  switch (format) {
    case CheckpointFormat::kSafetensors:
      return "safetensors";
    case CheckpointFormat::kSafetensorsSharded:
      return "safetensors-sharded";
    case CheckpointFormat::kTorchZip:
      return "torch-zip";
    case CheckpointFormat::kTorchScript:
      return "torchscript";
  }
  return "unknown";
}

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

const TensorInfo* CheckpointIndex::Find(absl::string_view name) const {
  auto it = by_name.find(std::string(name));
  return it == by_name.end() ? nullptr : &tensors[it->second];
}

uint64_t CheckpointIndex::total_bytes() const {
  uint64_t total = 0;
  for (const TensorInfo& t : tensors) total += t.nbytes;
  return total;
}

std::map<DType, uint64_t> CheckpointIndex::bytes_by_dtype() const {
  std::map<DType, uint64_t> out;
  for (const TensorInfo& t : tensors) out[t.dtype] += t.nbytes;
  return out;
}

int64_t CheckpointIndex::parameter_count() const {
  int64_t total = 0;
  for (const TensorInfo& t : tensors) total += t.numel();
  return total;
}

}  // namespace metaload::core
