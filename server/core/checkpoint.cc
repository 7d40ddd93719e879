#include "server/core/checkpoint.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "server/core/model_roots.h"
#include "server/core/safetensors_header.h"
#include "server/core/safetensors_index.h"

namespace metaload::core {
namespace {

constexpr uint64_t kMaxConfigBytes = 16 << 20;
constexpr char kLegacyTorchMagic[] = "\x80\x02\x8a\x0a";

CheckpointFile Describe(const std::string& path, const CheckedFile& f) {
  CheckpointFile out;
  out.path = path;
  out.size = f.size;
  out.mtime_ns = f.mtime_ns;
  out.device = static_cast<uint64_t>(f.device);
  out.inode = static_cast<uint64_t>(f.inode);
  return out;
}

// Something is there (a file, a FIFO, a dangling symlink is not); OpenChecked says what.
bool Exists(const std::string& path) {
  struct stat st;
  return ::lstat(path.c_str(), &st) == 0;
}

absl::StatusOr<std::string> ReadSmallFile(const std::string& path, uint64_t limit,
                                          const ModelRoots& roots) {
  absl::StatusOr<CheckedFile> f = OpenChecked(path, roots);
  if (!f.ok()) return f.status();
  if (f->size > limit) {
    return absl::DataLossError(absl::StrCat(path, ": larger than ", limit, " bytes"));
  }
  std::string out;
  char buf[65536];
  ssize_t n;
  while ((n = ::read(f->fd(), buf, sizeof(buf))) > 0 || (n < 0 && errno == EINTR)) {
    if (n < 0) continue;
    out.append(buf, static_cast<size_t>(n));
    if (out.size() > limit) {
      return absl::DataLossError(absl::StrCat(path, ": larger than ", limit, " bytes"));
    }
  }
  if (n < 0) return absl::DataLossError(absl::StrCat(path, ": ", std::strerror(errno)));
  return out;
}

void AddSafetensorsFile(const SafetensorsHeader& header, int file, CheckpointIndex* index) {
  for (const SafetensorsEntry& e : header.tensors) {
    TensorInfo t;
    t.name = e.name;
    t.dtype = e.dtype;
    t.shape = e.shape;
    t.file = file;
    t.offset = header.data_offset + e.begin;
    t.nbytes = e.end - e.begin;
    index->tensors.push_back(std::move(t));
  }
}

absl::StatusOr<CheckpointIndex> IndexSafetensors(const std::string& path, CheckedFile file,
                                                 std::vector<int>* fds) {
  CheckpointIndex index;
  index.format = CheckpointFormat::kSafetensors;
  index.path = path;
  absl::StatusOr<SafetensorsHeader> header = ReadSafetensorsHeader(file.fd(), file.size, path);
  if (!header.ok()) return header.status();
  index.files.push_back(Describe(path, file));
  fds->push_back(file.release());
  index.metadata = header->metadata;
  AddSafetensorsFile(*header, 0, &index);
  return index;
}

absl::StatusOr<CheckpointIndex> IndexShardedSafetensors(const std::string& dir,
                                                        const std::string& index_path,
                                                        const ModelRoots& roots,
                                                        std::vector<int>* fds) {
  absl::StatusOr<std::string> text = ReadSmallFile(index_path, kMaxSafetensorsIndexBytes, roots);
  if (!text.ok()) return text.status();
  absl::StatusOr<std::map<std::string, std::string>> weight_map =
      ParseSafetensorsIndex(*text, index_path);
  if (!weight_map.ok()) return weight_map.status();

  CheckpointIndex index;
  index.format = CheckpointFormat::kSafetensorsSharded;
  index.path = dir;
  std::set<std::string> shards;
  for (const auto& [name, shard] : *weight_map) shards.insert(shard);
  std::map<std::string, std::string> found;  // tensor -> shard it was found in
  for (const std::string& shard : shards) {
    // A shard is a file name next to the index, nothing else.
    if (shard.empty() || shard[0] == '/' || shard == "." || shard == ".." ||
        shard.rfind("../", 0) == 0 || shard.find("/../") != std::string::npos ||
        (shard.size() >= 3 && shard.compare(shard.size() - 3, 3, "/..") == 0)) {
      return absl::DataLossError(
          absl::StrCat(index_path, ": shard name '", shard, "' leaves the directory"));
    }
    const std::string shard_path = dir + "/" + shard;
    absl::StatusOr<CheckedFile> file = OpenChecked(shard_path, roots);
    absl::Status s = file.status();
    if (absl::IsNotFound(s)) {
      std::string example;
      for (const auto& [name, sh] : *weight_map) {
        if (sh == shard) {
          example = name;
          break;
        }
      }
      return absl::DataLossError(absl::StrCat(index_path, ": shard ", shard, " (for tensor '",
                                              example, "') does not exist"));
    }
    if (!s.ok()) return s;
    absl::StatusOr<SafetensorsHeader> header =
        ReadSafetensorsHeader(file->fd(), file->size, shard_path);
    if (!header.ok()) return header.status();
    for (const SafetensorsEntry& e : header->tensors) {
      auto previous = found.find(e.name);
      if (previous != found.end()) {
        return absl::DataLossError(absl::StrCat(dir, ": tensor '", e.name, "' is in two shards, ",
                                                previous->second, " and ", shard));
      }
      found[e.name] = shard;
      auto listed = weight_map->find(e.name);
      if (listed == weight_map->end()) {
        return absl::DataLossError(
            absl::StrCat(shard_path, ": tensor '", e.name, "' is not in the index's weight_map"));
      }
      if (listed->second != shard) {
        return absl::DataLossError(absl::StrCat(shard_path, ": tensor '", e.name,
                                                "' is here but the index says ", listed->second));
      }
    }
    const int file_number = static_cast<int>(index.files.size());
    index.files.push_back(Describe(shard_path, *file));
    fds->push_back(file->release());
    for (const auto& [k, v] : header->metadata) index.metadata.emplace(k, v);
    AddSafetensorsFile(*header, file_number, &index);
  }
  for (const auto& [name, shard] : *weight_map) {
    if (!found.count(name)) {
      return absl::DataLossError(absl::StrCat(index_path, ": weight_map entry '", name, "': shard ",
                                              shard, " has no such tensor"));
    }
  }
  return index;
}

absl::StatusOr<CheckpointIndex> IndexFile(const std::string& path, const ModelRoots& roots,
                                          std::vector<int>* fds) {
  absl::StatusOr<CheckedFile> file = OpenChecked(path, roots);
  if (!file.ok()) return file.status();
  char magic[4] = {0, 0, 0, 0};
  ssize_t n = ::pread(file->fd(), magic, sizeof(magic), 0);
  if (n == 4 && std::memcmp(magic, "PK\x03\x04", 4) == 0) {
    const CheckpointFile described = Describe(path, *file);
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

}  // namespace

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

MappedFile::~MappedFile() {
  if (data_ != nullptr) ::munmap(const_cast<void*>(data_), size_);
}

CheckpointSource::CheckpointSource(CheckpointIndex index, Options options)
    : index_(std::move(index)), options_(options) {}

CheckpointSource::~CheckpointSource() {
  for (int fd : fds_) ::close(fd);
}

absl::StatusOr<std::unique_ptr<CheckpointSource>> CheckpointSource::Open(const std::string& path,
                                                                         Options options) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT || errno == ENOTDIR) {
      return absl::NotFoundError(absl::StrCat(path, ": no such file or directory"));
    }
    return absl::FailedPreconditionError(absl::StrCat(path, ": ", std::strerror(errno)));
  }
  const ModelRoots roots(options.roots);
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
  absl::StatusOr<CheckpointIndex> index = absl::InternalError("unset");
  if (S_ISDIR(st.st_mode)) {
    std::string config;
    if (Exists(path + "/config.json")) {
      absl::StatusOr<std::string> text =
          ReadSmallFile(path + "/config.json", kMaxConfigBytes, roots);
      if (!text.ok()) return text.status();
      config = *std::move(text);
    }
    if (Exists(path + "/model.safetensors.index.json")) {
      index = IndexShardedSafetensors(path, path + "/model.safetensors.index.json", roots, &fds);
    } else if (Exists(path + "/model.safetensors")) {
      const std::string file = path + "/model.safetensors";
      absl::StatusOr<CheckedFile> opened = OpenChecked(file, roots);
      if (!opened.ok()) return opened.status();
      index = IndexSafetensors(file, *std::move(opened), &fds);
    } else if (Exists(path + "/pytorch_model.bin")) {
      const std::string file = path + "/pytorch_model.bin";
      absl::StatusOr<CheckedFile> opened = OpenChecked(file, roots);
      if (!opened.ok()) return opened.status();
      index = IndexTorchZipFd(opened->fd(), Describe(file, *opened));
      if (index.ok()) fds.push_back(opened->release());
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
  } else if (S_ISREG(st.st_mode)) {
    index = IndexFile(path, roots, &fds);
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
  if (fds.size() != index->files.size()) {
    return absl::InternalError(
        absl::StrCat(path, ": ", index->files.size(), " files but ", fds.size(), " descriptors"));
  }
  std::unique_ptr<CheckpointSource> source(new CheckpointSource(*std::move(index), options));
  source->fds_ = std::move(fds);
  close_unless_kept.fds = nullptr;
  source->maps_.resize(source->index_.files.size());
  return source;
}

absl::Status CheckpointSource::Read(const TensorInfo& tensor, uint64_t begin, uint64_t n,
                                    void* dst) const {
  if (begin > tensor.nbytes || n > tensor.nbytes - begin) {
    return absl::InternalError(absl::StrCat("read past the end of tensor '", tensor.name, "'"));
  }
  const int fd = fds_[static_cast<size_t>(tensor.file)];
  const std::string& path = index_.files[static_cast<size_t>(tensor.file)].path;
  auto read_range = [fd](char* out, uint64_t offset, uint64_t count) -> int {
    while (count > 0) {
      ssize_t r = ::pread(fd, out, count, static_cast<off_t>(offset));
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) return errno;
      if (r == 0) return -1;  // end of file: shorter than the index says
      out += r;
      offset += static_cast<uint64_t>(r);
      count -= static_cast<uint64_t>(r);
    }
    return 0;
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
    if (r == -1) {
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
  std::lock_guard<std::mutex> lock(map_mu_);
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
    std::lock_guard<std::mutex> lock(map_mu_);
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
