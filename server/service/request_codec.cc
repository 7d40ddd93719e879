#include "server/service/request_codec.h"

#include <optional>

#include "absl/strings/str_cat.h"
#include "server/core/device_name.h"
#include "server/core/dtype.h"
#include "server/core/dtype_policy.h"
#include "server/models/diffusion_info.h"

namespace metaload::service {
namespace {

void ToProto(const models::TensorSpec& spec, metaload::v1::TensorSpec* out) {
  out->set_name(spec.name);
  // An empty datatype means "the model's floating dtype" (whatever it was loaded as).
  if (spec.dtype) {
    std::optional<absl::string_view> name = core::KServeName(*spec.dtype);
    if (name) out->set_datatype(std::string(*name));
  }
  for (int64_t d : spec.shape) out->add_shape(d);
}

// A compute dtype named by a request (`field` says which), INVALID_ARGUMENT unless floating.
absl::StatusOr<core::DType> ParseComputeDtype(const std::string& field, const std::string& name) {
  std::optional<core::DType> dtype = core::DTypeFromName(name);
  if (!dtype || !core::IsFloatingPoint(*dtype) || core::IsFloat8(*dtype)) {
    return absl::InvalidArgumentError(absl::StrCat(
        field, " '", name,
        "': expected float32, bfloat16, float16 (GPU only) or float64 (empty compute_dtype: "
        "float32 on a cpu, the storage dtype on a GPU; float8 is a storage dtype only)"));
  }
  return *dtype;
}

absl::Status TooLong(absl::string_view field, size_t size, size_t limit) {
  return absl::InvalidArgumentError(absl::StrCat(field, ": ", size, " bytes; at most ", limit));
}

}  // namespace

absl::Status CheckLoadRequestLimits(const metaload::v1::LoadModelRequest& r,
                                    const LoadRequestLimits& l) {
  if (r.model_id().size() > l.max_model_id_bytes) {
    return TooLong("model_id", r.model_id().size(), l.max_model_id_bytes);
  }
  if (r.path().size() > l.max_path_bytes) return TooLong("path", r.path().size(), l.max_path_bytes);
  if (r.vae_path().size() > l.max_path_bytes) {
    return TooLong("vae_path", r.vae_path().size(), l.max_path_bytes);
  }
  if (r.prediction().size() > l.max_dtype_bytes) {
    return TooLong("prediction", r.prediction().size(), l.max_dtype_bytes);
  }
  if (r.architecture().size() > l.max_architecture_bytes) {
    return TooLong("architecture", r.architecture().size(), l.max_architecture_bytes);
  }
  if (r.device().size() > l.max_device_bytes) {
    return TooLong("device", r.device().size(), l.max_device_bytes);
  }
  if (r.dtype().size() > l.max_dtype_bytes) {
    return TooLong("dtype", r.dtype().size(), l.max_dtype_bytes);
  }
  if (r.compute_dtype().size() > l.max_dtype_bytes) {
    return TooLong("compute_dtype", r.compute_dtype().size(), l.max_dtype_bytes);
  }
  // Counts first: a flood is refused without walking it.
  const size_t n = static_cast<size_t>(r.dtype_overrides().size());
  if (n > l.max_dtype_overrides) {
    return absl::InvalidArgumentError(
        absl::StrCat("dtype_overrides: ", n, " entries; at most ", l.max_dtype_overrides));
  }
  size_t total = 0;
  for (const auto& [key, value] : r.dtype_overrides()) {
    if (key.size() > l.max_dtype_override_key_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("dtype_overrides: a key of ", key.size(),
                                                     " bytes; at most ",
                                                     l.max_dtype_override_key_bytes));
    }
    if (value.size() > l.max_dtype_override_value_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("dtype_overrides['", key, "']: a value of ",
                                                     value.size(), " bytes; at most ",
                                                     l.max_dtype_override_value_bytes));
    }
    total += key.size() + value.size();
  }
  if (total > l.max_dtype_overrides_total_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("dtype_overrides: ", total,
                                                   " bytes of keys and values; at most ",
                                                   l.max_dtype_overrides_total_bytes));
  }
  const size_t m = static_cast<size_t>(r.compute_dtype_overrides().size());
  if (m > l.max_compute_dtype_overrides) {
    return absl::InvalidArgumentError(absl::StrCat(
        "compute_dtype_overrides: ", m, " entries; at most ", l.max_compute_dtype_overrides));
  }
  for (const auto& [key, value] : r.compute_dtype_overrides()) {
    if (key.size() > l.max_compute_dtype_override_key_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("compute_dtype_overrides: a key of ",
                                                     key.size(), " bytes; at most ",
                                                     l.max_compute_dtype_override_key_bytes));
    }
    if (value.size() > l.max_dtype_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("compute_dtype_overrides['", key,
                                                     "']: a value of ", value.size(),
                                                     " bytes; at most ", l.max_dtype_bytes));
    }
  }
  return absl::OkStatus();
}

cache::WireTensor FromProto(metaload::v1::Tensor* t) {
  cache::WireTensor w;
  w.name = t->name();
  w.datatype = t->datatype();
  w.shape.assign(t->shape().begin(), t->shape().end());
  w.raw_data.swap(*t->mutable_raw_data());
  w.fp32_contents.assign(t->fp32_contents().begin(), t->fp32_contents().end());
  w.int64_contents.assign(t->int64_contents().begin(), t->int64_contents().end());
  return w;
}

void ToProto(cache::WireTensor* w, metaload::v1::Tensor* out) {
  out->set_name(w->name);
  out->set_datatype(w->datatype);
  for (int64_t d : w->shape) out->add_shape(d);
  if (!w->raw_data.empty()) out->mutable_raw_data()->swap(w->raw_data);
  out->mutable_fp32_contents()->Add(w->fp32_contents.begin(), w->fp32_contents.end());
  out->mutable_int64_contents()->Add(w->int64_contents.begin(), w->int64_contents.end());
}

absl::StatusOr<cache::LoadSpec> MakeLoadSpec(const metaload::v1::LoadModelRequest& request,
                                             const PathResolver& resolver,
                                             const LoadRequestLimits& limits) {
  if (absl::Status s = CheckLoadRequestLimits(request, limits); !s.ok()) return s;
  cache::LoadSpec spec;
  if (request.path().empty()) return absl::InvalidArgumentError("path is empty");
  if (absl::StatusOr<std::optional<core::DType>> dtype =
          core::ParseStorageDtype(request.dtype(), "dtype");
      !dtype.ok()) {
    return dtype.status();
  }
  if (!request.compute_dtype().empty()) {
    absl::StatusOr<core::DType> compute =
        ParseComputeDtype("compute_dtype", request.compute_dtype());
    if (!compute.ok()) return compute.status();
    spec.compute.dtype = *compute;
  }
  for (const auto& [entry, name] : request.compute_dtype_overrides()) {
    absl::StatusOr<core::DType> compute =
        ParseComputeDtype(absl::StrCat("compute_dtype_overrides['", entry, "']"), name);
    if (!compute.ok()) return compute.status();
    spec.compute.by_entry[entry] = *compute;
  }
  if (!request.prediction().empty() && !models::IsPredictionName(request.prediction())) {
    return absl::InvalidArgumentError(
        "prediction must be empty (the model's own), \"epsilon\" or \"v\"");
  }
  spec.prediction = request.prediction();
  const std::string device = request.device().empty() ? "cpu" : request.device();
  if (absl::Status named = core::ParseDeviceName(device).status(); !named.ok()) return named;
  absl::StatusOr<std::string> path = resolver.Resolve(request.path());
  if (!path.ok()) return path.status();
  spec.model_id =
      request.model_id().empty() ? PathResolver::Stem(request.path()) : request.model_id();
  if (spec.model_id.size() > limits.max_model_id_bytes) {  // a stem of a long path
    return TooLong("model_id (the path's stem)", spec.model_id.size(), limits.max_model_id_bytes);
  }
  for (unsigned char c : spec.model_id) {
    if (c < 0x20 || c == 0x7f) {
      return absl::InvalidArgumentError(
          "model_id contains a control character (it appears in logs and metric labels)");
    }
  }
  spec.path = *path;
  spec.display_path = request.path();
  if (!request.vae_path().empty()) {
    absl::StatusOr<std::string> vae = resolver.Resolve(request.vae_path());
    if (!vae.ok())
      return absl::Status(vae.status().code(), absl::StrCat("vae_path: ", vae.status().message()));
    spec.vae_path = *vae;
    spec.vae_display_path = request.vae_path();
  }
  spec.architecture = request.architecture();
  spec.device = device;
  spec.dtype = request.dtype();
  spec.dtype_overrides.insert(request.dtype_overrides().begin(), request.dtype_overrides().end());
  spec.allow_missing_keys = request.allow_missing_keys();
  spec.zero_copy = request.zero_copy();
  spec.replace = request.replace();
  spec.pin = request.pin();
  return spec;
}

void ToProto(const cache::ModelInfo& info, metaload::v1::ModelInfo* out) {
  out->set_model_id(info.model_id);
  out->set_path(info.path);
  out->set_architecture(info.architecture);
  out->set_device(info.device);
  out->set_dtype(info.dtype);
  out->set_state(info.state);
  out->set_parameter_count(info.parameter_count);
  out->set_resident_bytes(info.resident_bytes);
  out->set_sha256(info.sha256);
  out->set_short_hash(info.short_hash);
  for (const models::EntrySpec& e : info.entries) {
    metaload::v1::Entry* entry = out->add_entries();
    entry->set_name(e.name);
    for (const models::TensorSpec& t : e.inputs) ToProto(t, entry->add_inputs());
    for (const models::TensorSpec& t : e.outputs) ToProto(t, entry->add_outputs());
    if (e.storage_dtype) entry->set_storage_dtype(std::string(core::DTypeName(*e.storage_dtype)));
    if (e.compute_dtype) entry->set_compute_dtype(std::string(core::DTypeName(*e.compute_dtype)));
  }
  out->set_loaded_at_unix_ms(info.loaded_at_unix_ms);
  out->set_last_used_unix_ms(info.last_used_unix_ms);
  out->set_infer_count(info.infer_count);
  out->set_vae_path(info.vae_path);
  if (info.diffusion) {
    metaload::v1::Diffusion* d = out->mutable_diffusion();
    d->set_prediction(info.diffusion->prediction);
    d->set_prediction_source(info.diffusion->prediction_source);
    d->set_vae_scale_factor(info.diffusion->vae_scale_factor);
  }
}

void ToProto(const cache::LoadResult& result, metaload::v1::LoadModelResponse* out) {
  ToProto(result.model, out->mutable_model());
  out->set_cache_hit(result.cache_hit);
  metaload::v1::LoadStats* s = out->mutable_stats();
  s->set_total_seconds(result.stats.total_seconds);
  s->set_build_seconds(result.stats.build_seconds);
  s->set_read_seconds(result.stats.read_seconds);
  s->set_bytes_read(result.stats.bytes_read);
  s->set_peak_host_bytes(result.stats.peak_host_bytes);
  s->set_arena_reused_bytes(result.stats.arena_reused_bytes);
  s->set_peak_device_bytes(result.stats.peak_device_bytes);
  for (const std::string& k : result.stats.unexpected_keys) s->add_unexpected_keys(k);
}

}  // namespace metaload::service
