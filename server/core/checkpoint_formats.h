// Internal to server/core: how a path becomes a CheckpointIndex, shared by the format readers.
//   checkpoint_format.cc       IndexCheckpoint: what the path is (file, directory) and which
//                              reader it goes to; the CheckpointIndex queries.
//   checkpoint_safetensors.cc  a safetensors file and a sharded directory.
//   checkpoint_torch_zip.cc    torch.save and TorchScript zips.
//   checkpoint.cc              CheckpointSource: the opened files, read and mapped.
// server/core/README.md says how to add a format. Every reader opens its files with OpenChecked
// and hands their descriptors to the caller, in index order, so what was checked is what is read.
#ifndef METALOAD_SERVER_CORE_CHECKPOINT_FORMATS_H_
#define METALOAD_SERVER_CORE_CHECKPOINT_FORMATS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/core/checkpoint.h"
#include "server/core/model_roots.h"

namespace metaload::core {

// A checkpoint's file identity, the one formula: path, size, mtime, device and inode of the file
// that was opened and checked. CheckpointSource::CheckUnchanged and the checksum store compare
// against it.
CheckpointFile DescribeFile(const std::string& path, const CheckedFile& file);

// The whole of a small file (config.json, a shard index), at most `limit` bytes (DATA_LOSS
// beyond).
absl::StatusOr<std::string> ReadSmallFile(const std::string& path, uint64_t limit,
                                          const ModelRoots& roots);

// The index of whatever `path` is, tensors ordered by (file, offset) and by_name filled; the
// descriptors of index.files are appended to *fds in the same order (the caller closes them,
// also on error).
absl::StatusOr<CheckpointIndex> IndexCheckpoint(const std::string& path, const ModelRoots& roots,
                                                std::vector<int>* fds);

// checkpoint_safetensors.cc. `file` is the opened `path`; its descriptor moves to *fds.
absl::StatusOr<CheckpointIndex> IndexSafetensors(const std::string& path, CheckedFile file,
                                                 std::vector<int>* fds);
// A directory's model.safetensors.index.json and every shard it names.
absl::StatusOr<CheckpointIndex> IndexShardedSafetensors(const std::string& dir,
                                                        const std::string& index_path,
                                                        const ModelRoots& roots,
                                                        std::vector<int>* fds);

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_CHECKPOINT_FORMATS_H_
