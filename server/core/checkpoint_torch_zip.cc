// torch.save zip archives and TorchScript archives, indexed without LibTorch: the zip directory
// says where each storage record lies, the restricted unpickler (pickle_reader.h) says which
// tensor views which storage. Tensor bytes are then read in place like safetensors data.
#include <cstring>
#include <map>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/core/checkpoint.h"
#include "server/core/checkpoint_formats.h"
#include "server/core/file_io.h"
#include "server/core/model_roots.h"
#include "server/core/pickle_reader.h"
#include "server/core/zip_directory.h"

namespace metaload::core {
namespace {

using Kind = PickleValue::Kind;

// A state dict's pickle names its tensors' storages and is KiB to a few MiB; the parser may take
// 48 x its input (pickle_reader.h), so this limit is what bounds a planted file: 3 GiB at most.
constexpr uint64_t kMaxPickleBytes = uint64_t{64} << 20;

std::optional<DType> DTypeFromStorageType(absl::string_view global) {
  static const std::pair<absl::string_view, DType> kTypes[] = {
      {"torch.FloatStorage", DType::kFloat32}, {"torch.DoubleStorage", DType::kFloat64},
      {"torch.HalfStorage", DType::kFloat16},  {"torch.BFloat16Storage", DType::kBFloat16},
      {"torch.LongStorage", DType::kInt64},    {"torch.IntStorage", DType::kInt32},
      {"torch.ShortStorage", DType::kInt16},   {"torch.CharStorage", DType::kInt8},
      {"torch.ByteStorage", DType::kUInt8},    {"torch.BoolStorage", DType::kBool},
  };
  for (const auto& [name, dtype] : kTypes) {
    if (name == global) return dtype;
  }
  return std::nullopt;
}

bool IsInt(const PickleValue* v) { return v != nullptr && v->kind == Kind::kInt; }

// The tensor a value stands for: _rebuild_tensor_v2 directly, or wrapped in _rebuild_parameter.
const PickleValue* AsTensor(const PickleValue& v) {
  if (v.kind != Kind::kObject) return nullptr;
  if (v.text == "torch._utils._rebuild_tensor_v2") return &v;
  if ((v.text == "torch._utils._rebuild_parameter" ||
       v.text == "torch._utils._rebuild_parameter_with_state") &&
      !v.items.empty() && v.items[0]->kind == Kind::kObject &&
      v.items[0]->text == "torch._utils._rebuild_tensor_v2") {
    return v.items[0];
  }
  return nullptr;
}

class ZipIndexer {
 public:
  ZipIndexer(std::string path, ZipReadFn read, CheckpointFile file)
      : path_(std::move(path)), read_(std::move(read)), file_(std::move(file)) {}

  absl::StatusOr<CheckpointIndex> Run() {
    const ZipReadFn& read = read_;
    absl::StatusOr<std::vector<ZipEntry>> entries = ReadZipDirectory(read, file_.size, path_);
    if (!entries.ok()) return entries.status();
    std::string prefix;
    for (const ZipEntry& e : *entries) {
      records_[e.name] = e;
      if (absl::EndsWith(e.name, "/data.pkl") &&
          (prefix.empty() || e.name.size() - 9 < prefix.size())) {
        prefix = e.name.substr(0, e.name.size() - 9);
      }
    }
    CheckpointIndex index;
    index.path = path_;
    index.files.push_back(file_);
    const bool torchscript = records_.count(prefix + "/constants.pkl") > 0 ||
                             std::any_of(entries->begin(), entries->end(), [&](const ZipEntry& e) {
                               return absl::StartsWith(e.name, prefix + "/code/");
                             });
    if (!prefix.empty() && torchscript) {
      index.format = CheckpointFormat::kTorchScript;
      return index;
    }
    if (prefix.empty()) {
      return absl::DataLossError(
          absl::StrCat(path_, ": zip archive without data.pkl: not a torch.save checkpoint"));
    }
    index.format = CheckpointFormat::kTorchZip;
    prefix_ = prefix;

    if (auto bo = records_.find(prefix + "/byteorder"); bo != records_.end()) {
      std::string order;
      if (bo->second.method == 0 && bo->second.size <= 16 &&
          read(bo->second.data_offset, bo->second.size, &order) && order == "big") {
        return absl::FailedPreconditionError(
            absl::StrCat(path_, ": saved on a big-endian machine; metaload reads little-endian"));
      }
    }
    const ZipEntry& pkl = records_[prefix + "/data.pkl"];
    if (pkl.method != 0) {
      return absl::FailedPreconditionError(absl::StrCat(path_, ": data.pkl is compressed"));
    }
    if (pkl.size > kMaxPickleBytes) {
      return absl::DataLossError(absl::StrCat(path_, ": data.pkl of ", pkl.size, " bytes; at most ",
                                              kMaxPickleBytes,
                                              " (a state dict's pickle is KiB to a few MiB)"));
    }
    std::string bytes;
    if (!read(pkl.data_offset, pkl.size, &bytes)) {
      return absl::DataLossError(absl::StrCat(path_, ": short read of data.pkl"));
    }
    absl::StatusOr<std::unique_ptr<PickleDocument>> doc =
        ParsePickle(bytes, absl::StrCat(path_, ": data.pkl"));
    if (!doc.ok()) return doc.status();

    const PickleValue* dict = &(*doc)->root();
    if (dict->kind != Kind::kDict) {
      return absl::FailedPreconditionError(
          absl::StrCat(path_, ": holds a ", dict->TypeName(),
                       ", not a state dict (save model.state_dict(), or convert to safetensors)"));
    }
    // Lightning / SD .ckpt files keep the weights under "state_dict"; the rest is reported.
    for (size_t i = 0; i + 1 < dict->items.size(); i += 2) {
      const PickleValue* key = dict->items[i];
      const PickleValue* value = dict->items[i + 1];
      if (key->kind == Kind::kString && key->text == "state_dict" && value->kind == Kind::kDict) {
        for (size_t j = 0; j + 1 < dict->items.size(); j += 2) {
          if (j != i)
            index.skipped_entries.push_back(Describe(*dict->items[j], *dict->items[j + 1]));
        }
        dict = value;
        break;
      }
    }
    for (size_t i = 0; i + 1 < dict->items.size(); i += 2) {
      const PickleValue& key = *dict->items[i];
      const PickleValue& value = *dict->items[i + 1];
      const PickleValue* tensor = AsTensor(value);
      if (key.kind != Kind::kString || tensor == nullptr) {
        index.skipped_entries.push_back(Describe(key, value));
        continue;
      }
      absl::StatusOr<TensorInfo> info = Tensor(std::string(key.text), *tensor);
      if (!info.ok()) return info.status();
      index.tensors.push_back(*std::move(info));
    }
    return index;
  }

 private:
  static std::string Describe(const PickleValue& key, const PickleValue& value) {
    std::string name = key.kind == Kind::kString ? std::string(key.text)
                                                 : absl::StrCat("<", key.TypeName(), " key>");
    return absl::StrCat(name, " (", value.TypeName(), ")");
  }

  absl::Status Bad(const std::string& name, absl::string_view what) const {
    return absl::DataLossError(absl::StrCat(path_, ": tensor '", name, "': ", what));
  }

  absl::StatusOr<TensorInfo> Tensor(const std::string& name, const PickleValue& rebuild) {
    // _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks[, meta])
    if (rebuild.items.size() < 4) return Bad(name, "malformed _rebuild_tensor_v2 call");
    const PickleValue& persistent = *rebuild.items[0];
    if (persistent.kind != Kind::kPersistent || persistent.items.empty() ||
        persistent.items[0]->kind != Kind::kTuple || persistent.items[0]->items.size() < 5) {
      return Bad(name, "storage is not a persistent storage reference");
    }
    const auto& pid = persistent.items[0]->items;  // ('storage', type, key, location, numel)
    if (pid[0]->kind != Kind::kString || pid[0]->text != "storage" ||
        pid[1]->kind != Kind::kGlobal || pid[2]->kind != Kind::kString || !IsInt(pid[4])) {
      return Bad(name, "malformed storage reference");
    }
    std::optional<DType> dtype = DTypeFromStorageType(pid[1]->text);
    if (!dtype) {
      return absl::FailedPreconditionError(
          absl::StrCat(path_, ": tensor '", name, "': unsupported storage type ", pid[1]->text));
    }
    const int64_t storage_numel = pid[4]->integer;
    const PickleValue* offset = rebuild.items[1];
    const PickleValue* size = rebuild.items[2];
    const PickleValue* stride = rebuild.items[3];
    if (!IsInt(offset) || size->kind != Kind::kTuple || stride->kind != Kind::kTuple ||
        size->items.size() != stride->items.size() || storage_numel < 0 || offset->integer < 0) {
      return Bad(name, "malformed size, stride or offset");
    }
    TensorInfo t;
    t.name = name;
    t.dtype = *dtype;
    int64_t numel = 1;
    for (const PickleValue* d : size->items) {
      if (!IsInt(d) || d->integer < 0 || __builtin_mul_overflow(numel, d->integer, &numel)) {
        return Bad(name, "bad dimension");
      }
      t.shape.push_back(d->integer);
    }
    // Only row-major contiguous views can be read in place.
    int64_t expected = 1;
    for (size_t i = size->items.size(); i-- > 0;) {
      if (!IsInt(stride->items[i])) return Bad(name, "bad stride");
      if (t.shape[i] != 1 && numel != 0 && stride->items[i]->integer != expected) {
        return absl::FailedPreconditionError(absl::StrCat(
            path_, ": tensor '", name,
            "' is not contiguous in the file; save it with .contiguous() or as safetensors"));
      }
      expected *= t.shape[i];
    }
    const int64_t item = DTypeSize(*dtype);
    int64_t end_element = 0;
    if (__builtin_add_overflow(offset->integer, numel, &end_element) ||
        end_element > storage_numel) {
      return Bad(name, absl::StrCat("view [", offset->integer, ", +", numel,
                                    ") runs past its storage of ", storage_numel, " elements"));
    }
    auto record = records_.find(absl::StrCat(prefix_, "/data/", pid[2]->text));
    if (record == records_.end()) {
      return Bad(name, absl::StrCat("storage record data/", pid[2]->text, " is missing"));
    }
    if (record->second.method != 0) {
      return absl::FailedPreconditionError(
          absl::StrCat(path_, ": tensor '", name, "': storage record is compressed"));
    }
    if (static_cast<uint64_t>(storage_numel) > record->second.size / static_cast<uint64_t>(item)) {
      return Bad(name, absl::StrCat("storage of ", storage_numel, " elements needs more than its ",
                                    record->second.size, "-byte record"));
    }
    t.file = 0;
    t.offset = record->second.data_offset + static_cast<uint64_t>(offset->integer * item);
    t.nbytes = static_cast<uint64_t>(numel * item);
    return t;
  }

  std::string path_;
  ZipReadFn read_;
  CheckpointFile file_;
  std::string prefix_;
  std::map<std::string, ZipEntry> records_;
};

}  // namespace

absl::StatusOr<CheckpointIndex> IndexTorchZip(const std::string& path) {
  absl::StatusOr<CheckedFile> opened = OpenChecked(path, ModelRoots());
  if (!opened.ok()) return opened.status();
  return IndexTorchZipFd(opened->fd(), DescribeFile(path, *opened));
}

absl::StatusOr<CheckpointIndex> IndexTorchZipFd(int fd, const CheckpointFile& file) {
  auto read = [fd](uint64_t offset, uint64_t length, std::string* out) {
    out->resize(length);
    return PreadFully(fd, out->data(), length, offset) == 0;
  };
  return ZipIndexer(file.path, read, file).Run();
}

absl::StatusOr<CheckpointIndex> IndexTorchZipBytes(absl::string_view bytes,
                                                   const std::string& name) {
  CheckpointFile file;
  file.path = name;
  file.size = bytes.size();
  auto read = [bytes](uint64_t offset, uint64_t length, std::string* out) {
    if (offset > bytes.size() || length > bytes.size() - offset) return false;
    out->assign(bytes.data() + offset, length);
    return true;
  };
  return ZipIndexer(name, read, file).Run();
}

}  // namespace metaload::core
