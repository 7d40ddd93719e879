#include "server/cache/load_key.h"

#include <dirent.h>

#include <algorithm>
#include <vector>

#include "absl/strings/str_cat.h"
#include "server/cache/loaded_model.h"
#include "server/core/dtype.h"

namespace metaload::cache {
namespace {

// ModelInfo.dtype carries at most this much of the policy's description.
constexpr size_t kMaxInfoDtypeBytes = 1024;

}  // namespace

std::string BoundedDtype(std::string described) {
  if (described.size() <= kMaxInfoDtypeBytes) return described;
  const size_t room = kMaxInfoDtypeBytes - 48;  // for the suffix
  size_t cut = described.rfind(';', room);
  if (cut == std::string::npos) cut = room;
  const int64_t left_out = std::count(described.begin() + cut, described.end(), ';');
  described.resize(cut);
  absl::StrAppend(&described, ";...(", left_out, " more overrides; see the request)");
  return described;
}

namespace {

// One file's identity: what changes when its bytes do. ctime too, since `touch -d` can put
// mtime back but nothing can put ctime back.
void AppendIdentity(const struct stat& st, std::string* out) {
  absl::StrAppend(out, st.st_dev, ":", st.st_ino, ":", st.st_size, ":", st.st_mtim.tv_sec, ".",
                  st.st_mtim.tv_nsec, ":", st.st_ctim.tv_sec, ".", st.st_ctim.tv_nsec);
}

// Directories are walked this deep (a diffusers layout keeps its networks one level down) and
// at most this many entries are looked at; past it the key is unique to this call, so a
// directory that large is never a cache hit rather than a stale one.
constexpr int kMaxIdentityDepth = 2;
constexpr int kMaxIdentityEntries = 4096;

void AppendTreeIdentity(const std::string& dir, int depth, int* budget, std::string* out) {
  std::vector<std::string> names;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (struct dirent* e = ::readdir(d)) {
      const std::string name = e->d_name;
      if (name == "." || name == "..") continue;
      if (--*budget < 0) break;
      names.push_back(name);
    }
    ::closedir(d);
  }
  std::sort(names.begin(), names.end());
  for (const std::string& name : names) {
    const std::string path = absl::StrCat(dir, "/", name);
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) continue;
    if (S_ISDIR(st.st_mode)) {
      if (depth + 1 < kMaxIdentityDepth) {
        absl::StrAppend(out, "|", name, "/");
        AppendTreeIdentity(path, depth + 1, budget, out);
      }
    } else if (S_ISREG(st.st_mode)) {
      absl::StrAppend(out, "|", name, "=");
      AppendIdentity(st, out);
    }
  }
}

// The identity part of the cache key. A Hugging Face directory is keyed by every file in it
// (each shard, the index, config.json): its own stat does not change when a shard is
// rewritten in place (that was a stale cache hit on the old weights).
std::string FileIdentityKey(const std::string& path, const struct stat& st) {
  std::string key;
  AppendIdentity(st, &key);
  if (S_ISDIR(st.st_mode)) {
    int budget = kMaxIdentityEntries;
    AppendTreeIdentity(path, 0, &budget, &key);
    if (budget < 0) absl::StrAppend(&key, "|uncacheable:", NextUse());
  }
  return key;
}

// "compute=default" or "compute=bfloat16;vae_decode=float32" (by_entry is ordered).
std::string ComputeKey(const models::ComputeChoice& compute) {
  std::string key =
      absl::StrCat("compute=", compute.dtype ? core::DTypeName(*compute.dtype) : "default");
  for (const auto& [entry, dtype] : compute.by_entry) {
    absl::StrAppend(&key, ";", entry, "=", core::DTypeName(dtype));
  }
  return key;
}

// "|vae=PATH|IDENTITY", or "" without a VAE file. A VAE that cannot be stat'ed now keys apart
// from any other; its load fails opening it.
std::string VaeKey(const LoadSpec& spec) {
  if (spec.vae_path.empty()) return "";
  struct stat st;
  if (::stat(spec.vae_path.c_str(), &st) != 0) {
    return absl::StrCat("|vae=", spec.vae_path, "|missing:", NextUse());
  }
  return absl::StrCat("|vae=", spec.vae_path, "|", FileIdentityKey(spec.vae_path, st));
}

}  // namespace

std::string LoadKey(const LoadSpec& spec, const std::string& device,
                    const std::optional<core::DtypePolicy>& requested, const struct stat& st) {
  return absl::StrCat(spec.path, "|", FileIdentityKey(spec.path, st), "|", spec.architecture, "|",
                      device, "|", requested ? requested->Describe() : "default", "|",
                      ComputeKey(spec.compute), "|", spec.zero_copy ? "zero_copy" : "copy",
                      spec.allow_missing_keys ? "|allow_missing" : "",
                      spec.prediction.empty() ? "" : "|prediction=", spec.prediction, VaeKey(spec));
}

}  // namespace metaload::cache
