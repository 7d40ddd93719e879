// A safetensors file, and a Hugging Face directory of safetensors shards with its
// model.safetensors.index.json (every shard validated against the index).
#include <set>

#include "absl/strings/str_cat.h"
#include "server/core/checkpoint_formats.h"
#include "server/core/safetensors_header.h"
#include "server/core/safetensors_index.h"

namespace metaload::core {
namespace {

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

}  // namespace

absl::StatusOr<CheckpointIndex> IndexSafetensors(const std::string& path, CheckedFile file,
                                                 std::vector<int>* fds) {
  CheckpointIndex index;
  index.format = CheckpointFormat::kSafetensors;
  index.path = path;
  absl::StatusOr<SafetensorsHeader> header = ReadSafetensorsHeader(file.fd(), file.size, path);
  if (!header.ok()) return header.status();
  index.files.push_back(DescribeFile(path, file));
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
    index.files.push_back(DescribeFile(shard_path, *file));
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

}  // namespace metaload::core
