#include "server/core/safetensors_header.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/core/strict_json.h"

namespace metaload::core {
namespace {

using json = nlohmann::json;

constexpr int kMaxRank = 64;

absl::Status Corrupt(absl::string_view file, absl::string_view what) {
  return absl::DataLossError(absl::StrCat(file, ": safetensors header: ", what));
}

absl::Status CorruptTensor(absl::string_view file, absl::string_view tensor,
                           absl::string_view what) {
  return absl::DataLossError(
      absl::StrCat(file, ": safetensors header: tensor '", tensor, "': ", what));
}
absl::Status ParseEntry(const std::string& name, const json& value, uint64_t data_bytes,
                        absl::string_view file, SafetensorsEntry* out) {
  if (name.empty()) return Corrupt(file, "a tensor has an empty name");
  if (!value.is_object()) return CorruptTensor(file, name, "entry is not an object");
  for (const char* field : {"dtype", "shape", "data_offsets"}) {
    if (!value.contains(field)) return CorruptTensor(file, name, absl::StrCat("missing ", field));
  }
  if (value.size() != 3) {
    std::vector<std::string> extra;
    for (auto it = value.begin(); it != value.end(); ++it) {
      if (it.key() != "dtype" && it.key() != "shape" && it.key() != "data_offsets") {
        extra.push_back(it.key());
      }
    }
    return CorruptTensor(file, name,
                         absl::StrCat("unexpected field(s) ", absl::StrJoin(extra, ", ")));
  }
  out->name = name;

  const json& dtype = value["dtype"];
  if (!dtype.is_string()) return CorruptTensor(file, name, "dtype is not a string");
  std::optional<DType> parsed = DTypeFromSafetensorsName(dtype.get_ref<const std::string&>());
  if (!parsed) {
    return CorruptTensor(file, name,
                         absl::StrCat("unknown dtype '", dtype.get_ref<const std::string&>(), "'"));
  }
  out->dtype = *parsed;

  const json& shape = value["shape"];
  if (!shape.is_array()) return CorruptTensor(file, name, "shape is not an array");
  if (shape.size() > kMaxRank) {
    return CorruptTensor(file, name, absl::StrCat("rank ", shape.size(), " exceeds ", kMaxRank));
  }
  int64_t numel = 1;
  for (const json& dim : shape) {
    if (dim.is_number_integer() && !dim.is_number_unsigned()) {
      return CorruptTensor(file, name, absl::StrCat("negative dimension ", dim.get<int64_t>()));
    }
    if (!dim.is_number_unsigned()) {
      return CorruptTensor(file, name, "shape has a dimension that is not an integer");
    }
    uint64_t d = dim.get<uint64_t>();
    if (d > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) ||
        __builtin_mul_overflow(numel, static_cast<int64_t>(d), &numel)) {
      return CorruptTensor(file, name, "element count overflows int64");
    }
    out->shape.push_back(static_cast<int64_t>(d));
  }
  int64_t nbytes = 0;
  if (__builtin_mul_overflow(numel, static_cast<int64_t>(DTypeSize(out->dtype)), &nbytes)) {
    return CorruptTensor(file, name, "byte size overflows int64");
  }

  const json& offsets = value["data_offsets"];
  if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
      !offsets[1].is_number_unsigned()) {
    return CorruptTensor(file, name, "data_offsets is not two non-negative integers");
  }
  out->begin = offsets[0].get<uint64_t>();
  out->end = offsets[1].get<uint64_t>();
  if (out->begin > out->end) {
    return CorruptTensor(
        file, name,
        absl::StrCat("data_offsets [", out->begin, ", ", out->end, ") end before they begin"));
  }
  if (out->end > data_bytes) {
    return CorruptTensor(file, name,
                         absl::StrCat("data_offsets [", out->begin, ", ", out->end,
                                      ") run past the data section of ", data_bytes, " bytes"));
  }
  if (out->end - out->begin != static_cast<uint64_t>(nbytes)) {
    return CorruptTensor(file, name,
                         absl::StrCat("data_offsets span ", out->end - out->begin, " bytes but ",
                                      SafetensorsName(out->dtype), " shape [",
                                      absl::StrJoin(out->shape, ", "), "] needs ", nbytes));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(absl::string_view text,
                                                         uint64_t data_bytes,
                                                         absl::string_view file) {
  // A valid header nests three levels: root object, entry object, shape/offset arrays.
  absl::StatusOr<json> parsed =
      ParseStrictJson(text, /*max_depth=*/2, absl::StrCat(file, ": safetensors header"));
  if (!parsed.ok()) return parsed.status();
  const json& root = *parsed;
  if (!root.is_object()) return Corrupt(file, "not a JSON object");

  SafetensorsHeader header;
  header.header_bytes = text.size();
  header.data_offset = 8 + text.size();
  header.data_bytes = data_bytes;
  header.tensors.reserve(root.size());
  for (auto it = root.begin(); it != root.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (!it.value().is_object()) return Corrupt(file, "__metadata__ is not an object");
      for (auto m = it.value().begin(); m != it.value().end(); ++m) {
        if (!m.value().is_string()) {
          return Corrupt(file,
                         absl::StrCat("__metadata__ value of '", m.key(), "' is not a string"));
        }
        header.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    SafetensorsEntry entry;
    absl::Status s = ParseEntry(it.key(), it.value(), data_bytes, file, &entry);
    if (!s.ok()) return s;
    header.tensors.push_back(std::move(entry));
  }

  std::sort(header.tensors.begin(), header.tensors.end(),
            [](const SafetensorsEntry& a, const SafetensorsEntry& b) {
              return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
            });
  uint64_t covered = 0;
  for (const SafetensorsEntry& t : header.tensors) {
    if (t.begin < covered) {
      return CorruptTensor(file, t.name,
                           absl::StrCat("overlaps the previous tensor (starts at ", t.begin,
                                        ", previous ends at ", covered, ")"));
    }
    if (t.begin > covered) {
      return CorruptTensor(file, t.name,
                           absl::StrCat("leaves a gap before it (starts at ", t.begin,
                                        ", previous ends at ", covered, ")"));
    }
    covered = t.end;
  }
  if (covered != data_bytes) {
    return Corrupt(file, absl::StrCat("tensors cover ", covered, " bytes of a ", data_bytes,
                                      "-byte data section"));
  }
  return header;
}

namespace {

absl::StatusOr<uint64_t> HeaderLength(absl::string_view prefix, uint64_t file_size,
                                      absl::string_view file) {
  if (file_size < 8) {
    return Corrupt(file, absl::StrCat("file is ", file_size, " bytes, too short for a header"));
  }
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(prefix[i]);
  if (n > kMaxSafetensorsHeaderBytes) {
    return Corrupt(file, absl::StrCat("header length ", n, " exceeds the limit of ",
                                      kMaxSafetensorsHeaderBytes));
  }
  if (n > file_size - 8) {
    return Corrupt(file, absl::StrCat("header length ", n, " runs past the end of the ", file_size,
                                      "-byte file"));
  }
  return n;
}

}  // namespace

absl::StatusOr<SafetensorsHeader> ParseSafetensorsBytes(absl::string_view bytes,
                                                        absl::string_view file) {
  absl::StatusOr<uint64_t> n = HeaderLength(bytes.substr(0, 8), bytes.size(), file);
  if (!n.ok()) return n.status();
  return ParseSafetensorsHeader(bytes.substr(8, *n), bytes.size() - 8 - *n, file);
}

absl::StatusOr<SafetensorsHeader> ReadSafetensorsHeader(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return absl::NotFoundError(absl::StrCat(path, ": no such file"));
    return absl::FailedPreconditionError(absl::StrCat(path, ": ", std::strerror(errno)));
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    return absl::FailedPreconditionError(absl::StrCat(path, ": ", std::strerror(errno)));
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  std::string buffer(8, '\0');
  absl::StatusOr<uint64_t> n = absl::DataLossError("unread");
  if (size >= 8 && ::pread(fd, buffer.data(), 8, 0) != 8) {
    ::close(fd);
    return Corrupt(path, "cannot read the length prefix");
  }
  n = HeaderLength(buffer, size, path);
  if (!n.ok()) {
    ::close(fd);
    return n.status();
  }
  buffer.resize(*n);
  uint64_t done = 0;
  while (done < *n) {
    ssize_t r = ::pread(fd, buffer.data() + done, *n - done, static_cast<off_t>(8 + done));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      ::close(fd);
      return Corrupt(path, "file ended inside the header");
    }
    done += static_cast<uint64_t>(r);
  }
  ::close(fd);
  return ParseSafetensorsHeader(buffer, size - 8 - *n, path);
}

}  // namespace metaload::core
