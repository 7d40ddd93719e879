#include "server/core/checksum_store.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "server/core/file_io.h"
#include "server/core/log.h"
#include "server/core/model_roots.h"

namespace metaload::core {
namespace {

constexpr size_t kChunk = 4 << 20;

std::string Hex(const unsigned char* data, size_t n) {
  static const char kDigits[] = "0123456789abcdef";
  std::string out(2 * n, '0');
  for (size_t i = 0; i < n; ++i) {
    out[2 * i] = kDigits[data[i] >> 4];
    out[2 * i + 1] = kDigits[data[i] & 15];
  }
  return out;
}

}  // namespace

absl::StatusOr<std::unique_ptr<ChecksumStore>> ChecksumStore::Create(Options options) {
  if (!options.state_dir.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(options.state_dir, ec);
    if (ec && !std::filesystem::is_directory(options.state_dir)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--state_dir=", options.state_dir, ": cannot create: ", ec.message()));
    }
  }
  std::unique_ptr<ChecksumStore> store(new ChecksumStore(std::move(options)));
  store->Load();
  return store;
}

std::string ChecksumStore::Key(const std::vector<CheckpointFile>& files) {
  std::string key;
  for (const CheckpointFile& f : files) {
    absl::StrAppend(&key, key.empty() ? "" : "\n", f.path, "|", f.size, "|", f.mtime_ns);
  }
  return key;
}

void ChecksumStore::Load() {
  if (options_.state_dir.empty()) return;
  std::ifstream in(options_.state_dir + "/checksums.json");
  if (!in) return;
  std::stringstream ss;
  ss << in.rdbuf();
  nlohmann::json j = nlohmann::json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) {
    LogWarning("checksums_ignored")
        .Kv("path", options_.state_dir + "/checksums.json")
        .Kv("reason", "not a JSON object");
    return;
  }
  MutexLock lock(&mu_);
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it.value().is_string()) hashes_[it.key()] = it.value().get<std::string>();
  }
}

void ChecksumStore::Persist() {
  if (options_.state_dir.empty()) return;
  const std::string path = options_.state_dir + "/checksums.json";
  const std::string tmp = path + ".tmp";
  std::string text = nlohmann::json(hashes_).dump(1) + "\n";
  // A fresh file, never a planted symlink or FIFO: unlink what is there, create exclusively.
  ::unlink(tmp.c_str());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
  int saved_errno = fd >= 0 ? WriteFully(fd, text.data(), text.size()) : errno;
  bool ok = saved_errno == 0;
  if (fd >= 0 && ::close(fd) != 0 && ok) {
    ok = false;
    saved_errno = errno;
  }
  if (ok && ::rename(tmp.c_str(), path.c_str()) != 0) {
    ok = false;
    saved_errno = errno;
  }
  if (!ok) {
    ::unlink(tmp.c_str());
    LogWarning("checksums_not_saved").Kv("path", path).Kv("error", std::strerror(saved_errno));
  }
}

std::optional<std::string> ChecksumStore::Lookup(const std::vector<CheckpointFile>& files) const {
  MutexLock lock(&mu_);
  auto it = hashes_.find(Key(files));
  if (it == hashes_.end()) return std::nullopt;
  return it->second;
}

absl::StatusOr<std::string> ChecksumStore::Compute(const std::vector<CheckpointFile>& files,
                                                   const std::atomic<bool>* cancel) {
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) {
    return absl::InternalError("sha256: cannot initialise");
  }
  std::vector<char> buffer(kChunk);
  for (const CheckpointFile& f : files) {
    absl::StatusOr<CheckedFile> file = OpenChecked(f.path, ModelRoots());
    if (absl::IsNotFound(file.status()) || (file.ok() && f.inode != 0 &&
                                            (static_cast<uint64_t>(file->device) != f.device ||
                                             static_cast<uint64_t>(file->inode) != f.inode))) {
      // The file the load checked and read, not whatever the path names now (a swapped symlink).
      return absl::DataLossError(absl::StrCat(f.path, ": not the file that was loaded any more"));
    }
    if (!file.ok()) return file.status();
    const int fd = file->fd();
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
    uint64_t done = 0;
    while (done < f.size) {
      if (cancel != nullptr && cancel->load(std::memory_order_relaxed)) {
        return absl::CancelledError(absl::StrCat("sha256 of ", f.path, " cancelled"));
      }
      ssize_t n = ::read(fd, buffer.data(), std::min<uint64_t>(kChunk, f.size - done));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        return absl::DataLossError(absl::StrCat(f.path, ": file ended while hashing"));
      }
      EVP_DigestUpdate(ctx.get(), buffer.data(), static_cast<size_t>(n));
      done += static_cast<uint64_t>(n);
    }
  }
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  EVP_DigestFinal_ex(ctx.get(), digest, &length);
  std::string hex = Hex(digest, length);
  MutexLock lock(&mu_);
  hashes_[Key(files)] = hex;
  Persist();
  return hex;
}

}  // namespace metaload::core
