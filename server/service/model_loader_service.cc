#include "server/service/model_loader_service.h"

#include <mutex>
#include <optional>

#include "absl/strings/str_cat.h"
#include "server/core/dtype.h"
#include "server/service/grpc_status.h"

namespace metaload::service {
namespace {

using metaload::v1::LoadEvent;

bool ConstantTimeEquals(const std::string& a, const std::string& b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

void ToProto(const models::TensorSpec& spec, metaload::v1::TensorSpec* out) {
  out->set_name(spec.name);
  // An empty datatype means "the model's floating dtype" (whatever it was loaded as).
  if (spec.dtype) {
    std::optional<absl::string_view> name = core::KServeName(*spec.dtype);
    if (name) out->set_datatype(std::string(*name));
  }
  for (int64_t d : spec.shape) out->add_shape(d);
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

// LoadModel: finishes when the cache calls back; a cancelled call leaves the load (which stops
// only when every caller has left).
class LoadReactor : public grpc::ServerUnaryReactor {
 public:
  LoadReactor(cache::ModelCache* cache, const cache::LoadSpec& spec,
              metaload::v1::LoadModelResponse* response)
      : response_(response) {
    waiter_ = cache->Load(spec, nullptr, [this](absl::StatusOr<cache::LoadResult> result) {
      if (result.ok()) metaload::service::ToProto(*result, response_);
      Finish(ToGrpcStatus(result.status()));
    });
  }
  void OnCancel() override {
    if (waiter_->Cancel())
      Finish(grpc::Status(grpc::StatusCode::CANCELLED, "load cancelled by the caller"));
  }
  void OnDone() override { delete this; }

 private:
  metaload::v1::LoadModelResponse* response_;
  std::shared_ptr<cache::LoadWaiter> waiter_;
};

// LoadModelStream: progress events, coalesced to the newest while a write is in flight, then
// one last event carrying the result. At most one write is outstanding, as the API requires.
class LoadStreamReactor : public grpc::ServerWriteReactor<LoadEvent> {
 public:
  LoadStreamReactor(cache::ModelCache* cache, const cache::LoadSpec& spec) {
    std::shared_ptr<cache::LoadWaiter> waiter = cache->Load(
        spec,
        [this](const cache::LoadProgressEvent& e) {
          LoadEvent event;
          event.set_phase(e.phase);
          event.set_bytes_done(e.bytes_done);
          event.set_bytes_total(e.bytes_total);
          std::lock_guard<std::mutex> lock(mu_);
          if (finished_ || failed_ || final_) return;
          if (writing_) {
            pending_ = std::move(event);
          } else {
            WriteLocked(std::move(event));
          }
        },
        [this](absl::StatusOr<cache::LoadResult> result) {
          std::lock_guard<std::mutex> lock(mu_);
          if (!result.ok()) {
            FailLocked(ToGrpcStatus(result.status()));
            return;
          }
          LoadEvent event;
          event.set_phase("done");
          event.set_bytes_done(result->stats.bytes_read);
          event.set_bytes_total(result->stats.bytes_read);
          metaload::service::ToProto(*result, event.mutable_result());
          final_ = std::move(event);
          pending_.reset();
          if (!writing_) {
            final_in_flight_ = true;
            WriteLocked(std::move(*final_));
          }
        });
    std::lock_guard<std::mutex> lock(mu_);
    waiter_ = std::move(waiter);
  }

  void OnWriteDone(bool ok) override {
    std::lock_guard<std::mutex> lock(mu_);
    writing_ = false;
    if (final_in_flight_) return FinishLocked(grpc::Status::OK);
    if (!ok) return FailLocked(grpc::Status(grpc::StatusCode::CANCELLED, "client stopped reading"));
    if (failed_) return FinishLocked(status_);
    if (final_) {
      final_in_flight_ = true;
      return WriteLocked(std::move(*final_));
    }
    if (pending_) {
      LoadEvent next = std::move(*pending_);
      pending_.reset();
      WriteLocked(std::move(next));
    }
  }

  void OnCancel() override {
    std::shared_ptr<cache::LoadWaiter> waiter;
    {
      std::lock_guard<std::mutex> lock(mu_);
      waiter = waiter_;
    }
    if (waiter && waiter->Cancel()) {
      std::lock_guard<std::mutex> lock(mu_);
      FailLocked(grpc::Status(grpc::StatusCode::CANCELLED, "load cancelled by the caller"));
    }
  }

  void OnDone() override { delete this; }

 private:
  void WriteLocked(LoadEvent event) {
    current_ = std::move(event);
    writing_ = true;
    StartWrite(&current_);
  }
  void FailLocked(grpc::Status status) {
    if (failed_ || finished_) return;
    failed_ = true;
    status_ = std::move(status);
    pending_.reset();
    if (!writing_) FinishLocked(status_);
  }
  void FinishLocked(grpc::Status status) {
    if (finished_) return;
    finished_ = true;
    Finish(std::move(status));
  }

  std::mutex mu_;
  std::shared_ptr<cache::LoadWaiter> waiter_;  // guarded by mu_
  LoadEvent current_;                          // the event being written
  std::optional<LoadEvent> pending_;           // newest progress not yet written
  std::optional<LoadEvent> final_;             // the result event, once known
  bool writing_ = false, final_in_flight_ = false, failed_ = false, finished_ = false;
  grpc::Status status_;
};

// Infer: runs on the cache's infer pool; the model is held for the duration.
class InferReactor : public grpc::ServerUnaryReactor {
 public:
  InferReactor(cache::ModelCache* cache, metaload::v1::InferRequest* request,
               metaload::v1::InferResponse* response) {
    std::vector<cache::WireTensor> inputs;
    for (metaload::v1::Tensor& t : *request->mutable_inputs()) inputs.push_back(FromProto(&t));
    response->set_model_id(request->model_id());
    cache->Infer(request->model_id(), request->entry(), std::move(inputs), request->typed_outputs(),
                 [this, response](absl::StatusOr<std::vector<cache::WireTensor>> outputs) {
                   if (outputs.ok()) {
                     for (cache::WireTensor& w : *outputs) ToProto(&w, response->add_outputs());
                   }
                   Finish(ToGrpcStatus(outputs.status()));
                 });
  }
  void OnDone() override { delete this; }
};

}  // namespace

absl::StatusOr<cache::LoadSpec> MakeLoadSpec(const metaload::v1::LoadModelRequest& request,
                                             const PathResolver& resolver) {
  cache::LoadSpec spec;
  if (request.path().empty()) return absl::InvalidArgumentError("path is empty");
  if (!request.dtype().empty() && request.dtype() != "float32" && request.dtype() != "float16" &&
      request.dtype() != "bfloat16") {
    return absl::InvalidArgumentError(absl::StrCat(
        "dtype '", request.dtype(), "': expected float32, float16 or bfloat16 (or empty to keep)"));
  }
  const std::string device = request.device().empty() ? "cpu" : request.device();
  if (device != "cpu" && device != "cuda" && device.rfind("cuda:", 0) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("device '", device, "': expected cpu, cuda or cuda:N"));
  }
  absl::StatusOr<std::string> path = resolver.Resolve(request.path());
  if (!path.ok()) return path.status();
  spec.model_id =
      request.model_id().empty() ? PathResolver::Stem(request.path()) : request.model_id();
  if (spec.model_id.size() > 256)
    return absl::InvalidArgumentError("model_id is longer than 256 bytes");
  spec.path = *path;
  spec.display_path = request.path();
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
  }
  out->set_loaded_at_unix_ms(info.loaded_at_unix_ms);
  out->set_last_used_unix_ms(info.last_used_unix_ms);
  out->set_infer_count(info.infer_count);
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
  s->set_peak_device_bytes(result.stats.peak_device_bytes);
  for (const std::string& k : result.stats.unexpected_keys) s->add_unexpected_keys(k);
}

grpc::Status ModelLoaderService::Admit(grpc::CallbackServerContext* context) const {
  if (draining_.load()) {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, "metaloadd is shutting down");
  }
  if (!options_.auth_token.empty()) {
    const auto& metadata = context->client_metadata();
    auto it = metadata.find("authorization");
    const std::string given =
        it == metadata.end() ? "" : std::string(it->second.data(), it->second.size());
    if (!ConstantTimeEquals(given, "Bearer " + options_.auth_token)) {
      return grpc::Status(
          grpc::StatusCode::UNAUTHENTICATED,
          it == metadata.end() ? "missing authorization: Bearer <token>" : "wrong bearer token");
    }
  }
  return grpc::Status::OK;
}

grpc::ServerUnaryReactor* ModelLoaderService::LoadModel(
    grpc::CallbackServerContext* context, const metaload::v1::LoadModelRequest* request,
    metaload::v1::LoadModelResponse* response) {
  grpc::Status admitted = Admit(context);
  absl::StatusOr<cache::LoadSpec> spec = admitted.ok()
                                             ? MakeLoadSpec(*request, *resolver_)
                                             : absl::StatusOr<cache::LoadSpec>(absl::OkStatus());
  if (!admitted.ok() || !spec.ok()) {
    auto* reactor = context->DefaultReactor();
    reactor->Finish(admitted.ok() ? ToGrpcStatus(spec.status()) : admitted);
    return reactor;
  }
  return new LoadReactor(cache_, *spec, response);
}

grpc::ServerWriteReactor<LoadEvent>* ModelLoaderService::LoadModelStream(
    grpc::CallbackServerContext* context, const metaload::v1::LoadModelRequest* request) {
  grpc::Status admitted = Admit(context);
  absl::StatusOr<cache::LoadSpec> spec = admitted.ok()
                                             ? MakeLoadSpec(*request, *resolver_)
                                             : absl::StatusOr<cache::LoadSpec>(absl::OkStatus());
  if (!admitted.ok() || !spec.ok()) {
    class Refused : public grpc::ServerWriteReactor<LoadEvent> {
     public:
      explicit Refused(grpc::Status s) { Finish(std::move(s)); }
      void OnDone() override { delete this; }
    };
    return new Refused(admitted.ok() ? ToGrpcStatus(spec.status()) : admitted);
  }
  return new LoadStreamReactor(cache_, *spec);
}

grpc::ServerUnaryReactor* ModelLoaderService::UnloadModel(
    grpc::CallbackServerContext* context, const metaload::v1::UnloadModelRequest* request,
    metaload::v1::UnloadModelResponse* response) {
  auto* reactor = context->DefaultReactor();
  grpc::Status admitted = Admit(context);
  if (!admitted.ok()) {
    reactor->Finish(admitted);
    return reactor;
  }
  absl::StatusOr<cache::ModelInfo> info = cache_->Unload(request->model_id());
  if (info.ok()) ToProto(*info, response->mutable_model());
  reactor->Finish(ToGrpcStatus(info.status()));
  return reactor;
}

grpc::ServerUnaryReactor* ModelLoaderService::GetModel(grpc::CallbackServerContext* context,
                                                       const metaload::v1::GetModelRequest* request,
                                                       metaload::v1::ModelInfo* response) {
  auto* reactor = context->DefaultReactor();
  grpc::Status admitted = Admit(context);
  if (!admitted.ok()) {
    reactor->Finish(admitted);
    return reactor;
  }
  absl::StatusOr<cache::ModelInfo> info = cache_->Get(request->model_id());
  if (info.ok()) ToProto(*info, response);
  reactor->Finish(ToGrpcStatus(info.status()));
  return reactor;
}

grpc::ServerUnaryReactor* ModelLoaderService::ListModels(
    grpc::CallbackServerContext* context, const metaload::v1::ListModelsRequest*,
    metaload::v1::ListModelsResponse* response) {
  auto* reactor = context->DefaultReactor();
  grpc::Status admitted = Admit(context);
  if (!admitted.ok()) {
    reactor->Finish(admitted);
    return reactor;
  }
  for (const cache::ModelInfo& info : cache_->List()) ToProto(info, response->add_models());
  for (const auto& [device, bytes] : cache_->ResidentBytes()) {
    (*response->mutable_resident_bytes_by_device())[device] = bytes;
  }
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* ModelLoaderService::Infer(grpc::CallbackServerContext* context,
                                                    const metaload::v1::InferRequest* request,
                                                    metaload::v1::InferResponse* response) {
  grpc::Status admitted = Admit(context);
  if (!admitted.ok() || request->model_id().empty()) {
    auto* reactor = context->DefaultReactor();
    reactor->Finish(admitted.ok()
                        ? grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "model_id is empty")
                        : admitted);
    return reactor;
  }
  // The request is ours until the reactor finishes; its tensor bytes are moved, not copied.
  return new InferReactor(cache_, const_cast<metaload::v1::InferRequest*>(request), response);
}

}  // namespace metaload::service
