#include "server/core/safetensors_header.h"

#include <algorithm>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/core/file_io.h"
#include "server/core/model_roots.h"
#include "server/core/strict_json.h"

namespace metaload::core {
namespace {

constexpr int kMaxRank = 64;

absl::Status Corrupt(absl::string_view file, absl::string_view what) {
  return absl::DataLossError(absl::StrCat(file, ": safetensors header: ", what));
}

absl::Status CorruptTensor(absl::string_view file, absl::string_view tensor,
                           absl::string_view what) {
  return absl::DataLossError(
      absl::StrCat(file, ": safetensors header: tensor '", tensor, "': ", what));
}
// Non-negative JSON integer -> uint64; false for negatives, fractions and other types.
bool AsUnsigned(simdjson::dom::element e, uint64_t* out) {
  if (e.type() == simdjson::dom::element_type::UINT64)
    return e.get_uint64().get(*out) == simdjson::SUCCESS;
  int64_t v = 0;
  if (e.type() != simdjson::dom::element_type::INT64 || e.get_int64().get(v) != simdjson::SUCCESS ||
      v < 0) {
    return false;
  }
  *out = static_cast<uint64_t>(v);
  return true;
}

absl::Status ParseEntry(std::string_view key, simdjson::dom::element value, uint64_t data_bytes,
                        absl::string_view file, SafetensorsEntry* out) {
  const std::string name(key);
  if (name.empty()) return Corrupt(file, "a tensor has an empty name");
  simdjson::dom::object object;
  if (value.get_object().get(object) != simdjson::SUCCESS) {
    return CorruptTensor(file, name, "entry is not an object");
  }
  absl::Status unique = CheckUniqueKeys(object, absl::StrCat(file, ": safetensors header"));
  if (!unique.ok()) return unique;
  simdjson::dom::element dtype, shape, offsets;
  bool has_dtype = false, has_shape = false, has_offsets = false;
  std::vector<std::string> extra;
  for (simdjson::dom::key_value_pair field : object) {
    if (field.key == "dtype") {
      dtype = field.value;
      has_dtype = true;
    } else if (field.key == "shape") {
      shape = field.value;
      has_shape = true;
    } else if (field.key == "data_offsets") {
      offsets = field.value;
      has_offsets = true;
    } else {
      extra.emplace_back(field.key);
    }
  }
  if (!has_dtype) return CorruptTensor(file, name, "missing dtype");
  if (!has_shape) return CorruptTensor(file, name, "missing shape");
  if (!has_offsets) return CorruptTensor(file, name, "missing data_offsets");
  if (!extra.empty()) {
    return CorruptTensor(file, name,
                         absl::StrCat("unexpected field(s) ", absl::StrJoin(extra, ", ")));
  }
  out->name = name;

  std::string_view dtype_name;
  if (dtype.get_string().get(dtype_name) != simdjson::SUCCESS) {
    return CorruptTensor(file, name, "dtype is not a string");
  }
  std::optional<DType> parsed = DTypeFromSafetensorsName(ToAbsl(dtype_name));
  if (!parsed) {
    return CorruptTensor(file, name, absl::StrCat("unknown dtype '", ToAbsl(dtype_name), "'"));
  }
  out->dtype = *parsed;

  simdjson::dom::array dims;
  if (shape.get_array().get(dims) != simdjson::SUCCESS) {
    return CorruptTensor(file, name, "shape is not an array");
  }
  if (dims.size() > kMaxRank) {
    return CorruptTensor(file, name, absl::StrCat("rank ", dims.size(), " exceeds ", kMaxRank));
  }
  int64_t numel = 1;
  for (simdjson::dom::element dim : dims) {
    int64_t negative = 0;
    if (dim.type() == simdjson::dom::element_type::INT64 &&
        dim.get_int64().get(negative) == simdjson::SUCCESS && negative < 0) {
      return CorruptTensor(file, name, absl::StrCat("negative dimension ", negative));
    }
    uint64_t d = 0;
    if (!AsUnsigned(dim, &d)) {
      return CorruptTensor(file, name, "shape has a dimension that is not an integer");
    }
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

  simdjson::dom::array range;
  if (offsets.get_array().get(range) != simdjson::SUCCESS || range.size() != 2 ||
      !AsUnsigned(range.at(0).value_unsafe(), &out->begin) ||
      !AsUnsigned(range.at(1).value_unsafe(), &out->end)) {
    return CorruptTensor(file, name, "data_offsets is not two non-negative integers");
  }
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

absl::StatusOr<SafetensorsHeader> ParseHeader(absl::string_view text, bool padded,
                                              uint64_t data_bytes, absl::string_view file) {
  // A valid header nests three levels: root object, entry objects, shape/offset arrays.
  // One parser per header, freed on return (see strict_json.h for what a kept one costs).
  StrictJsonParser parser;
  const std::string context = absl::StrCat(file, ": safetensors header");
  absl::StatusOr<simdjson::dom::element> parsed =
      parser.Parse(text, /*max_depth=*/4, context, padded);
  if (!parsed.ok()) return parsed.status();
  simdjson::dom::object root;
  if (parsed->get_object().get(root) != simdjson::SUCCESS) {
    return Corrupt(file, "not a JSON object");
  }
  absl::Status unique = CheckUniqueKeys(root, context);
  if (!unique.ok()) return unique;

  SafetensorsHeader header;
  header.header_bytes = text.size();
  header.data_offset = 8 + text.size();
  header.data_bytes = data_bytes;
  header.tensors.reserve(root.size());
  for (simdjson::dom::key_value_pair field : root) {
    if (field.key == "__metadata__") {
      simdjson::dom::object metadata;
      if (field.value.get_object().get(metadata) != simdjson::SUCCESS) {
        return Corrupt(file, "__metadata__ is not an object");
      }
      for (simdjson::dom::key_value_pair m : metadata) {
        std::string_view value;
        if (m.value.get_string().get(value) != simdjson::SUCCESS) {
          return Corrupt(
              file, absl::StrCat("__metadata__ value of '", ToAbsl(m.key), "' is not a string"));
        }
        header.metadata[std::string(m.key)] = std::string(value);
      }
      continue;
    }
    SafetensorsEntry entry;
    absl::Status s = ParseEntry(field.key, field.value, data_bytes, file, &entry);
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

}  // namespace

absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(absl::string_view text,
                                                         uint64_t data_bytes,
                                                         absl::string_view file) {
  return ParseHeader(text, /*padded=*/false, data_bytes, file);
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
    // The length is the file's first 8 bytes: never quoted, they may be anything (a secret).
    return Corrupt(file, absl::StrCat("the 8-byte header length exceeds the limit of ",
                                      kMaxSafetensorsHeaderBytes, " (not a safetensors file?)"));
  }
  if (n > file_size - 8) {
    return Corrupt(file, absl::StrCat("the 8-byte header length runs past the end of the ",
                                      file_size, "-byte file (not a safetensors file?)"));
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
  absl::StatusOr<CheckedFile> file = OpenChecked(path, ModelRoots());
  if (!file.ok()) return file.status();
  return ReadSafetensorsHeader(file->fd(), file->size, path);
}

absl::StatusOr<SafetensorsHeader> ReadSafetensorsHeader(int fd, uint64_t size,
                                                        const std::string& path) {
  std::string buffer(8, '\0');
  if (size >= 8 && PreadFully(fd, buffer.data(), 8, 0) != 0) {
    return Corrupt(path, "cannot read the length prefix");
  }
  absl::StatusOr<uint64_t> n = HeaderLength(buffer, size, path);
  if (!n.ok()) return n.status();
  // Zeroed padding after the header, so simdjson parses it in place rather than copying it.
  buffer.assign(*n + simdjson::SIMDJSON_PADDING, '\0');
  if (PreadFully(fd, buffer.data(), *n, 8) != 0)
    return Corrupt(path, "file ended inside the header");
  return ParseHeader(absl::string_view(buffer.data(), *n), /*padded=*/true, size - 8 - *n, path);
}

}  // namespace metaload::core
