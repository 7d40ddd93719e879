// torchscript: any torch.jit.save archive, loaded straight onto the requested device by
// torch::jit::load. Entry "forward" comes from the method's schema; inputs are positional.
// TorchScript is a program: loading runs its code. The cache refuses it unless the operator
// opted in (--allow_torchscript). The archive is read from the descriptor the checkpoint source
// checked against the model roots, never reopened by name.
#include <torch/script.h>

#include <chrono>
#include <istream>
#include <streambuf>
#include <unordered_set>
#include <vector>

#include "absl/strings/str_cat.h"
#include "server/core/dtype_policy.h"
#include "server/core/exception_boundary.h"
#include "server/core/torch_types.h"
#include "server/models/module_model.h"

namespace metaload::models {
namespace {

// An istream over a read-only mapping, seekable, as torch::jit::load needs.
class MappedStreamBuf : public std::streambuf {
 public:
  MappedStreamBuf(const char* data, size_t size) {
    char* p = const_cast<char*>(data);
    setg(p, p, p + size);
  }

 protected:
  pos_type seekoff(off_type off, std::ios_base::seekdir dir, std::ios_base::openmode) override {
    char* base = dir == std::ios_base::beg ? eback() : dir == std::ios_base::cur ? gptr() : egptr();
    if (off < eback() - base || off > egptr() - base) return pos_type(off_type(-1));
    setg(eback(), base + off, egptr());
    return pos_type(gptr() - eback());
  }
  pos_type seekpos(pos_type pos, std::ios_base::openmode which) override {
    return seekoff(off_type(pos), std::ios_base::beg, which);
  }
};

// Every distinct storage a TorchScript object reaches, through its attributes (parameters,
// buffers and plain tensor attributes alike: a __setstate__ can allocate into any of them),
// lists, tuples and dicts. Storages shared by two attributes count once. At most kMaxVisited
// values are walked (a hostile object graph cannot make this loop forever).
uint64_t HeldStorageBytes(const c10::IValue& root) {
  constexpr size_t kMaxVisited = 1 << 20;
  std::unordered_set<const void*> storages, seen;
  std::vector<c10::IValue> stack = {root};
  uint64_t total = 0;
  size_t visited = 0;
  auto add = [&](const at::Tensor& t) {
    if (!t.defined()) return;
    if (t.is_sparse()) {
      stack.push_back(t._indices());
      stack.push_back(t._values());
      return;
    }
    if (!t.has_storage()) return;
    if (storages.insert(t.storage().unsafeGetStorageImpl()).second) total += t.storage().nbytes();
  };
  while (!stack.empty() && ++visited < kMaxVisited) {
    c10::IValue v = std::move(stack.back());
    stack.pop_back();
    if (v.isTensor()) {
      add(v.toTensor());
    } else if (v.isObject()) {
      auto object = v.toObject();
      if (!seen.insert(object.get()).second) continue;
      for (const c10::IValue& slot : object->slots()) stack.push_back(slot);
    } else if (v.isTuple()) {
      for (const c10::IValue& e : v.toTupleRef().elements()) stack.push_back(e);
    } else if (v.isList()) {
      if (!seen.insert(v.internalToPointer()).second) continue;
      for (const c10::IValue& e : v.toListRef()) stack.push_back(e);
    } else if (v.isGenericDict()) {
      if (!seen.insert(v.internalToPointer()).second) continue;
      for (const auto& kv : v.toGenericDict()) {
        stack.push_back(kv.key());
        stack.push_back(kv.value());
      }
    }
  }
  return total;
}

class TorchScriptModel : public Model {
 public:
  explicit TorchScriptModel(std::string path) : path_(std::move(path)) {}

  std::string architecture() const override { return "torchscript"; }

  // Its code decides what it allocates: the archive's size is a first guess, and the cache
  // counts what the loaded module holds.
  ByteEstimate EstimateBytes(const core::CheckpointIndex& index, const core::DtypePolicy& policy,
                             bool allow_missing_keys) const override {
    return {index.files.empty() ? 0 : index.files[0].size, /*upper_bound=*/false};
  }

  std::vector<EntrySpec> Entries() const override {
    EntrySpec e{"forward", {}, {{"output", std::nullopt, {}}}};
    for (const std::string& name : arguments_) e.inputs.push_back({name, std::nullopt, {}});
    return {e};
  }

  absl::StatusOr<core::LoadReport> Load(const core::CheckpointSource& source,
                                        core::LoadOptions options,
                                        const ComputeChoice& compute) override {
    if (compute.dtype || !compute.by_entry.empty()) {
      return absl::FailedPreconditionError(
          absl::StrCat(path_, ": compute_dtype cannot be set for TorchScript (its code decides)"));
    }
    // The request is checked before the file's code runs: "keep" (and the default, which is
    // keep) leaves the module as stored, a dtype converts all of it, and per-prefix overrides
    // cannot be honoured.
    const std::optional<core::DType> dtype = options.policy.default_dtype();
    if (dtype && core::IsFloat8(*dtype)) {
      return absl::InvalidArgumentError(
          absl::StrCat("dtype '", core::DTypeName(*dtype),
                       "': TorchScript runs its weights as stored, so it cannot hold float8 (the "
                       "layer-kit architectures can)"));
    }
    if (options.policy.has_overrides()) {
      return absl::InvalidArgumentError(absl::StrCat(
          path_,
          ": dtype_overrides cannot apply to TorchScript, which converts as one module "
          "(use dtype)"));
    }
    const auto start = std::chrono::steady_clock::now();
    const c10::Device device = options.device;
    absl::StatusOr<std::shared_ptr<const core::MappedFile>> mapped = source.Map(0);
    if (!mapped.ok()) return mapped.status();
    try {
      MappedStreamBuf buffer((*mapped)->data(), (*mapped)->size());
      std::istream in(&buffer);
      module_ = torch::jit::load(in, device);
      module_.eval();
      if (dtype) module_.to(core::ToScalarType(*dtype));
      const c10::FunctionSchema& schema = module_.get_method("forward").function().getSchema();
      for (size_t i = 1; i < schema.arguments().size(); ++i) {
        arguments_.push_back(schema.arguments()[i].name());
      }
    } catch (...) {
      absl::Status s = core::CurrentExceptionToStatus(path_);
      if (absl::IsResourceExhausted(s)) return s;
      return core::CurrentExceptionToStatus(
          absl::StrCat(path_, ": TorchScript archive does not load"), absl::StatusCode::kDataLoss);
    }
    core::LoadReport report;
    held_bytes_ = HeldStorageBytes(module_._ivalue());
    report.loaded_bytes = held_bytes_;
    report.bytes_read = (*mapped)->size();
    report.tensors = static_cast<int>(module_.parameters().size() + module_.buffers().size());
    // What the loaded module holds; its code may have allocated and freed more meanwhile,
    // which no per-load figure can see without an allocator hook (README "Memory model").
    if (device.is_cpu()) {
      report.peak_host_bytes = static_cast<int64_t>(held_bytes_);
    } else {
      report.peak_device_bytes = static_cast<int64_t>(held_bytes_);
    }
    report.seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    device_ = device;
    if (options.progress) options.progress({"done", report.bytes_read, report.bytes_read});
    return report;
  }

  absl::StatusOr<NamedTensors> Run(const std::string& entry,
                                   const std::map<std::string, at::Tensor>& inputs) const override {
    if (!entry.empty() && entry != "forward") {
      return absl::InvalidArgumentError(absl::StrCat("unknown entry '", entry, "' (forward)"));
    }
    std::vector<c10::IValue> args;
    for (const std::string& name : arguments_) {
      auto it = inputs.find(name);
      if (it == inputs.end()) {
        return absl::InvalidArgumentError(absl::StrCat("entry 'forward' needs input '", name, "'"));
      }
      args.push_back(it->second.to(device_));
    }
    if (inputs.size() != arguments_.size()) {
      return absl::InvalidArgumentError("entry 'forward' got inputs it does not take");
    }
    try {
      c10::InferenceMode guard;
      c10::IValue out = const_cast<torch::jit::Module&>(module_).forward(args);
      NamedTensors result;
      if (out.isTensor()) {
        result.push_back({"output", out.toTensor()});
      } else if (out.isTuple()) {
        const auto& elements = out.toTupleRef().elements();
        for (size_t i = 0; i < elements.size(); ++i) {
          if (!elements[i].isTensor())
            return absl::FailedPreconditionError("forward returned a non-tensor");
          result.push_back({absl::StrCat("output_", i), elements[i].toTensor()});
        }
      } else {
        return absl::FailedPreconditionError("forward returned neither a tensor nor a tuple");
      }
      return result;
    } catch (...) {
      absl::Status s = core::CurrentExceptionToStatus("entry 'forward'");
      if (absl::IsResourceExhausted(s) || absl::IsInternal(s)) return s;
      return core::CurrentExceptionToStatus("forward failed on these inputs",
                                            absl::StatusCode::kInvalidArgument);
    }
  }

  int64_t ParameterCount() const override {
    int64_t n = 0;
    for (const auto& p : module_.parameters()) n += p.numel();
    return n;
  }
  // Measured once, after loading: every storage the module reaches (HeldStorageBytes).
  uint64_t ResidentBytes() const override { return held_bytes_; }

 private:
  std::string path_;
  torch::jit::Module module_;
  std::vector<std::string> arguments_;
  uint64_t held_bytes_ = 0;
  c10::Device device_ = c10::Device(c10::kCPU);
};

}  // namespace

absl::StatusOr<std::unique_ptr<Model>> BuildTorchScript(const core::CheckpointIndex& index) {
  if (index.format != core::CheckpointFormat::kTorchScript || index.files.size() != 1) {
    return absl::FailedPreconditionError(absl::StrCat(index.path, ": not a TorchScript archive (",
                                                      core::CheckpointFormatName(index.format),
                                                      ")"));
  }
  return std::unique_ptr<Model>(new TorchScriptModel(index.files[0].path));
}

}  // namespace metaload::models
