#include "server/models/module_model.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/core/dtype_policy.h"
#include "server/core/exception_boundary.h"
#include "server/core/torch_types.h"

namespace metaload::models {
namespace {

// "unet, text_encoder, vae_decode, vae_encode": what an unknown-entry error offers instead.
std::string EntryNames(const std::vector<EntrySpec>& entries) {
  return absl::StrJoin(entries, ", ",
                       [](std::string* out, const EntrySpec& e) { out->append(e.name); });
}

}  // namespace

absl::StatusOr<core::LoadReport> ModuleModel::Load(const core::CheckpointSource& source,
                                                   core::LoadOptions options,
                                                   const ComputeChoice& compute) {
  device_ = options.device;
  // Every network's compute dtype, if the request names one: checked before loading.
  const std::vector<EntrySpec> entries = Entries();
  std::map<std::string, std::pair<core::DType, std::string>> asked;  // prefix -> dtype, entry
  for (const auto& [name, dtype] : compute.by_entry) {
    auto it = std::find_if(entries.begin(), entries.end(),
                           [&](const EntrySpec& e) { return e.name == name; });
    if (it == entries.end()) {
      return absl::InvalidArgumentError(absl::StrCat("compute_dtype_overrides: no entry '", name,
                                                     "' (", EntryNames(entries), ")"));
    }
    auto [other, inserted] = asked.emplace(EntryPrefix(name), std::make_pair(dtype, name));
    if (!inserted && other->second.first != dtype) {
      return absl::InvalidArgumentError(
          absl::StrCat("compute_dtype_overrides: entries '", other->second.second, "' and '", name,
                       "' run one network and must compute in one dtype"));
    }
  }
  std::vector<core::DType> named;
  if (compute.dtype) named.push_back(*compute.dtype);
  for (const auto& [prefix, dtype] : asked) named.push_back(dtype.first);
  for (core::DType dtype : named) {
    if (!core::IsFloatingPoint(dtype) || core::IsFloat8(dtype)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "compute_dtype '", core::DTypeName(dtype),
          core::IsFloat8(dtype) ? "': float8 is a storage format; no kernel computes in it"
                                : "' is not a floating-point dtype"));
    }
    if (device_.is_cpu() && dtype == core::DType::kFloat16) {
      return absl::FailedPreconditionError(
          "compute_dtype float16 needs a GPU: LibTorch's CPU kernels lack float16 matmul; on a "
          "cpu, float16 weights compute in float32 (the default) or bfloat16");
    }
  }
  if (key_map_) options.checkpoint_key = key_map_;
  absl::StatusOr<core::LoadReport> report = core::LoadModule(*module_, source, options);
  if (!report.ok()) return report;
  const std::vector<core::TensorSlot> slots = module_->Slots();
  for (const EntrySpec& entry : entries) {
    const std::string prefix = EntryPrefix(entry.name);
    // The network's storage dtype is the one most of its floating values are stored in (a
    // policy may keep some prefixes in another).
    std::map<core::DType, int64_t> values;
    for (const core::TensorSlot& slot : slots) {
      if (slot.name.rfind(prefix, 0) != 0) continue;
      if (*slot.float8) {
        values[**slot.float8] += slot.tensor->numel();
      } else if (at::isFloatingType(slot.tensor->scalar_type())) {
        values[*core::FromScalarType(slot.tensor->scalar_type())] += slot.tensor->numel();
      }
    }
    core::DType storage = core::DType::kFloat32;
    std::optional<core::DType> unconverted;  // the most common dtype that is not float8
    int64_t most = -1, most_unconverted = -1;
    for (const auto& [type, count] : values) {
      if (count > most) storage = type, most = count;
      if (!core::IsFloat8(type) && count > most_unconverted)
        unconverted = type, most_unconverted = count;
    }
    // float8 weights compute in the dtype the network's other values keep (a bfloat16 Llama
    // with float8 matmul weights computes in bfloat16 on a GPU, not float16), else the default.
    const core::DType basis = core::IsFloat8(storage) && unconverted ? *unconverted : storage;
    auto it = asked.find(prefix);
    const at::ScalarType compute_dtype = it != asked.end() ? core::ToScalarType(it->second.first)
                                         : compute.dtype
                                             ? core::ToScalarType(*compute.dtype)
                                             : core::DefaultComputeDtype(basis, device_);
    module_->SetComputeDtype(prefix, compute_dtype);
    entry_dtypes_[entry.name] = {storage, compute_dtype};
  }
  return report;
}

std::vector<EntrySpec> ModuleModel::LoadedEntries() const {
  std::vector<EntrySpec> entries = Entries();
  for (EntrySpec& entry : entries) {
    auto it = entry_dtypes_.find(entry.name);
    if (it == entry_dtypes_.end()) continue;
    entry.storage_dtype = it->second.storage;
    entry.compute_dtype = core::FromScalarType(it->second.compute);
  }
  return entries;
}

absl::StatusOr<core::DtypePolicy> EffectivePolicy(
    const Model& model, const std::optional<core::DtypePolicy>& requested) {
  if (requested) return *requested;
  const DtypeChoice defaults = model.DefaultDtypes();
  return core::DtypePolicy::Create(defaults.dtype, defaults.overrides, /*keep_float8=*/true);
}

absl::StatusOr<core::DtypePolicy> EffectivePolicy(
    const Model& model, absl::string_view dtype,
    const std::map<std::string, std::string>& overrides) {
  absl::StatusOr<std::optional<core::DtypePolicy>> requested =
      core::DtypePolicy::FromRequest(dtype, overrides);
  if (!requested.ok()) return requested.status();
  return EffectivePolicy(model, *requested);
}

absl::StatusOr<NamedTensors> ModuleModel::Run(
    const std::string& entry_name, const std::map<std::string, at::Tensor>& inputs) const {
  std::vector<EntrySpec> entries = Entries();
  const EntrySpec* entry = entry_name.empty() ? &entries.front() : nullptr;
  for (const EntrySpec& e : entries) {
    if (e.name == entry_name) entry = &e;
  }
  if (entry == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown entry '", entry_name, "' (", EntryNames(entries), ")"));
  }
  auto dtype_it = entry_dtypes_.find(entry->name);
  const at::ScalarType float_dtype =
      dtype_it == entry_dtypes_.end() ? at::kFloat : dtype_it->second.compute;
  std::map<std::string, at::Tensor> ready;
  for (const auto& [name, tensor] : inputs) {
    const TensorSpec* spec = nullptr;
    for (const TensorSpec& s : entry->inputs) {
      if (s.name == name) spec = &s;
    }
    if (spec == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("entry '", entry->name, "' has no input '", name, "'"));
    }
    if (tensor.dim() != static_cast<int64_t>(spec->shape.size())) {
      return absl::InvalidArgumentError(absl::StrCat("input '", name, "': rank ", tensor.dim(),
                                                     ", expected ", spec->shape.size()));
    }
    for (size_t d = 0; d < spec->shape.size(); ++d) {
      if (spec->shape[d] >= 0 && tensor.size(static_cast<int64_t>(d)) != spec->shape[d]) {
        return absl::InvalidArgumentError(absl::StrCat("input '", name, "': dimension ", d, " is ",
                                                       tensor.size(static_cast<int64_t>(d)),
                                                       ", expected ", spec->shape[d]));
      }
    }
    at::Tensor t = tensor;
    if (spec->dtype) {
      if (t.scalar_type() != core::ToScalarType(*spec->dtype)) {
        return absl::InvalidArgumentError(
            absl::StrCat("input '", name, "': ", c10::toString(t.scalar_type()), ", expected ",
                         core::DTypeName(*spec->dtype)));
      }
    } else {
      if (!at::isFloatingType(t.scalar_type())) {
        return absl::InvalidArgumentError(
            absl::StrCat("input '", name, "': expected a floating-point tensor"));
      }
      t = t.to(float_dtype);
    }
    ready[name] = t.to(device_);
  }
  for (const TensorSpec& s : entry->inputs) {
    if (!s.optional && !ready.count(s.name)) {
      return absl::InvalidArgumentError(
          absl::StrCat("entry '", entry->name, "' needs input '", s.name, "'"));
    }
  }
  try {
    c10::InferenceMode guard;
    return Forward(entry->name, ready);
  } catch (...) {
    // Out of memory is the server's state, not the caller's inputs: RESOURCE_EXHAUSTED. The rest
    // are shapes the spec allows but the weights do not (a sequence longer than the positions).
    absl::Status s = core::CurrentExceptionToStatus(absl::StrCat("entry '", entry->name, "'"));
    if (absl::IsResourceExhausted(s) || absl::IsInternal(s)) return s;
    return core::CurrentExceptionToStatus(
        absl::StrCat("entry '", entry->name, "' failed on these inputs"),
        absl::StatusCode::kInvalidArgument);
  }
}

int64_t ModuleModel::ParameterCount() const { return module_->ParameterCount(); }

namespace {

// a * b, or UINT64_MAX when it overflows.
uint64_t SaturatingMul(uint64_t a, uint64_t b) {
  uint64_t out;
  return __builtin_mul_overflow(a, b, &out) ? UINT64_MAX : out;
}

uint64_t SaturatingAdd(uint64_t a, uint64_t b) {
  uint64_t out;
  return __builtin_add_overflow(a, b, &out) ? UINT64_MAX : out;
}

}  // namespace

Model::ByteEstimate ModuleModel::EstimateBytes(const core::CheckpointIndex& index,
                                               const core::DtypePolicy& policy,
                                               bool allow_missing_keys) const {
  uint64_t total = 0;
  for (const core::TensorSlot& slot : module_->Slots()) {
    const std::string key = key_map_ ? key_map_(slot.name) : slot.name;
    const core::TensorInfo* info = index.Find(key);
    uint64_t elements = 1;
    for (int64_t d : slot.tensor->sizes()) {
      elements = SaturatingMul(elements, static_cast<uint64_t>(std::max<int64_t>(d, 0)));
    }
    uint64_t item = 0;
    if (info != nullptr) {
      item = static_cast<uint64_t>(core::DTypeSize(policy.Resolve(key, info->dtype, slot.use)));
    } else if (allow_missing_keys) {
      item = static_cast<uint64_t>(c10::elementSize(slot.tensor->scalar_type()));
    }
    total = SaturatingAdd(total, SaturatingMul(elements, item));
  }
  return {total, /*upper_bound=*/true};
}

uint64_t ModuleModel::ResidentBytes() const {
  uint64_t total = 0;
  for (const core::TensorSlot& slot : module_->Slots()) total += slot.tensor->nbytes();
  return total;
}

absl::StatusOr<nlohmann::json> ParseConfig(const core::CheckpointIndex& index,
                                           const std::string& arch) {
  if (index.config_json.empty()) return nlohmann::json::object();
  nlohmann::json config = nlohmann::json::parse(index.config_json, nullptr, false);
  if (!config.is_object()) {
    return absl::FailedPreconditionError(
        absl::StrCat(index.path, ": config.json is not a JSON object (", arch, ")"));
  }
  return config;
}

absl::StatusOr<int64_t> ConfigInt(const nlohmann::json& config, const char* key,
                                  const std::string& arch, std::optional<int64_t> fallback) {
  auto it = config.find(key);
  if (it == config.end() || it->is_null()) {
    if (fallback) return *fallback;
    return absl::FailedPreconditionError(absl::StrCat(arch, ": config.json lacks ", key));
  }
  if (!it->is_number_integer() || it->get<int64_t>() <= 0) {
    return absl::FailedPreconditionError(
        absl::StrCat(arch, ": config.json ", key, " must be a positive integer"));
  }
  return it->get<int64_t>();
}

absl::StatusOr<double> ConfigDouble(const nlohmann::json& config, const char* key,
                                    const std::string& arch, std::optional<double> fallback) {
  auto it = config.find(key);
  if (it == config.end() || it->is_null()) {
    if (fallback) return *fallback;
    return absl::FailedPreconditionError(absl::StrCat(arch, ": config.json lacks ", key));
  }
  if (!it->is_number()) {
    return absl::FailedPreconditionError(
        absl::StrCat(arch, ": config.json ", key, " must be a number"));
  }
  return it->get<double>();
}

absl::StatusOr<std::string> ConfigString(const nlohmann::json& config, const char* key,
                                         const std::string& arch, std::string fallback) {
  auto it = config.find(key);
  if (it == config.end() || it->is_null()) return fallback;
  if (!it->is_string()) {
    return absl::FailedPreconditionError(
        absl::StrCat(arch, ": config.json ", key, " must be a string"));
  }
  return it->get<std::string>();
}

absl::StatusOr<bool> ConfigBool(const nlohmann::json& config, const char* key,
                                const std::string& arch, bool fallback) {
  auto it = config.find(key);
  if (it == config.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) {
    return absl::FailedPreconditionError(
        absl::StrCat(arch, ": config.json ", key, " must be true or false"));
  }
  return it->get<bool>();
}

}  // namespace metaload::models
