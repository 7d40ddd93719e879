#include "server/core/safetensors_writer.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "absl/strings/str_cat.h"
#include "server/core/file_io.h"

namespace metaload::core {
namespace {

constexpr int64_t kChunkBytes = 16 << 20;

absl::Status WriteAll(int fd, const char* data, size_t size, const std::string& path) {
  if (const int error = WriteFully(fd, data, size); error != 0) {
    return absl::InternalError(absl::StrCat("write ", path, ": ", IoErrorMessage(error)));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status SafetensorsWriter::Add(std::string name, DType dtype, std::vector<int64_t> shape,
                                    FillFn fill) {
  if (name.empty() || name == "__metadata__") {
    return absl::InvalidArgumentError(
        absl::StrCat("safetensors writer: bad tensor name '", name, "'"));
  }
  for (const Tensor& t : tensors_) {
    if (t.name == name) {
      return absl::InvalidArgumentError(
          absl::StrCat("safetensors writer: duplicate tensor ", name));
    }
  }
  const int size = DTypeSize(dtype);
  int64_t nbytes = size;
  for (int64_t d : shape) {
    if (d < 0 || (d > 0 && nbytes > std::numeric_limits<int64_t>::max() / d)) {
      return absl::InvalidArgumentError(absl::StrCat("safetensors writer: bad shape for ", name));
    }
    nbytes *= d;
  }
  if (data_bytes_ > std::numeric_limits<int64_t>::max() - nbytes) {
    return absl::InvalidArgumentError("safetensors writer: data section overflows int64");
  }
  data_bytes_ += nbytes;
  tensors_.push_back(
      {std::move(name), std::move(dtype), std::move(shape), nbytes, size, std::move(fill)});
  return absl::OkStatus();
}

absl::Status SafetensorsWriter::Write(const std::string& path) const {
  std::vector<const Tensor*> order;
  for (const Tensor& t : tensors_) order.push_back(&t);
  std::stable_sort(order.begin(), order.end(),
                   [](const Tensor* a, const Tensor* b) { return a->item_size > b->item_size; });

  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata_.empty()) header["__metadata__"] = metadata_;
  int64_t offset = 0;
  for (const Tensor* t : order) {
    header[t->name] = {{"dtype", std::string(SafetensorsName(t->dtype))},
                       {"shape", t->shape},
                       {"data_offsets", {offset, offset + t->nbytes}}};
    offset += t->nbytes;
  }
  std::string json = header.dump();
  json.append((8 - json.size() % 8) % 8, ' ');
  char prefix[8];
  uint64_t n = json.size();
  for (int i = 0; i < 8; ++i) prefix[i] = static_cast<char>((n >> (8 * i)) & 0xff);

  std::string tmp = path + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return absl::InternalError(absl::StrCat("create ", tmp, ": ", std::strerror(errno)));
  absl::Status status = WriteAll(fd, prefix, sizeof(prefix), tmp);
  if (status.ok()) status = WriteAll(fd, json.data(), json.size(), tmp);
  std::vector<char> buffer(static_cast<size_t>(std::min<int64_t>(kChunkBytes, data_bytes_)));
  for (const Tensor* t : order) {
    for (int64_t done = 0; status.ok() && done < t->nbytes;) {
      int64_t chunk = std::min<int64_t>(kChunkBytes, t->nbytes - done);
      t->fill(buffer.data(), done, chunk);
      status = WriteAll(fd, buffer.data(), static_cast<size_t>(chunk), tmp);
      done += chunk;
    }
  }
  if (::close(fd) != 0 && status.ok()) {
    status = absl::InternalError(absl::StrCat("close ", tmp, ": ", std::strerror(errno)));
  }
  if (status.ok() && ::rename(tmp.c_str(), path.c_str()) != 0) {
    status = absl::InternalError(absl::StrCat("rename to ", path, ": ", std::strerror(errno)));
  }
  if (!status.ok()) ::unlink(tmp.c_str());
  return status;
}

}  // namespace metaload::core
