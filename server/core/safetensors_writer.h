// Writes safetensors files (format: safetensors_header.h) without holding the data in memory:
// each tensor's bytes come from a fill callback, called in bounded chunks while writing.
//
// Tensors are laid out largest element size first (then in the order added), so every tensor
// is aligned to its element size in the file, which lets readers map them without copying.
// Write() goes to a temporary file and renames it into place: a reader never sees half a file.
// Not thread-safe; one writer per file.
#ifndef METALOAD_SERVER_CORE_SAFETENSORS_WRITER_H_
#define METALOAD_SERVER_CORE_SAFETENSORS_WRITER_H_

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "server/core/dtype.h"

namespace metaload::core {

class SafetensorsWriter {
 public:
  // Fills dst with `nbytes` bytes of the tensor, starting at byte `offset` of its data.
  using FillFn = std::function<void(char* dst, int64_t offset, int64_t nbytes)>;

  // Declares a tensor. INVALID_ARGUMENT for a duplicate or empty name, a negative dimension or
  // a byte size overflowing int64.
  absl::Status Add(std::string name, DType dtype, std::vector<int64_t> shape, FillFn fill);

  void SetMetadata(std::string key, std::string value) {
    metadata_[std::move(key)] = std::move(value);
  }

  // Bytes of the data section so far.
  int64_t data_bytes() const { return data_bytes_; }
  size_t tensor_count() const { return tensors_.size(); }

  // Writes the file. The callbacks run on the calling thread.
  absl::Status Write(const std::string& path) const;

 private:
  struct Tensor {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    int64_t nbytes;
    int item_size;
    FillFn fill;
  };
  std::vector<Tensor> tensors_;
  std::map<std::string, std::string> metadata_;
  int64_t data_bytes_ = 0;
};

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_SAFETENSORS_WRITER_H_
