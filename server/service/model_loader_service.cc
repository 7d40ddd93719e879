#include "server/service/model_loader_service.h"

#include <mutex>
#include <optional>

#include "absl/strings/str_cat.h"
#include "server/core/dtype.h"
#include "server/service/grpc_status.h"
#include "server/service/request_codec.h"

namespace metaload::service {
namespace {

using metaload::v1::LoadEvent;

bool ConstantTimeEquals(const std::string& a, const std::string& b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
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
  // Refusals first: a StatusOr is never built from an OK status (Debian's Abseil aborts on it).
  grpc::Status admitted = Admit(context);
  if (!admitted.ok()) {
    auto* reactor = context->DefaultReactor();
    reactor->Finish(admitted);
    return reactor;
  }
  absl::StatusOr<cache::LoadSpec> spec = MakeLoadSpec(*request, *resolver_);
  if (!spec.ok()) {
    auto* reactor = context->DefaultReactor();
    reactor->Finish(ToGrpcStatus(spec.status()));
    return reactor;
  }
  return new LoadReactor(cache_, *spec, response);
}

grpc::ServerWriteReactor<LoadEvent>* ModelLoaderService::LoadModelStream(
    grpc::CallbackServerContext* context, const metaload::v1::LoadModelRequest* request) {
  class Refused : public grpc::ServerWriteReactor<LoadEvent> {
   public:
    explicit Refused(grpc::Status s) { Finish(std::move(s)); }
    void OnDone() override { delete this; }
  };
  grpc::Status admitted = Admit(context);
  if (!admitted.ok()) return new Refused(admitted);
  absl::StatusOr<cache::LoadSpec> spec = MakeLoadSpec(*request, *resolver_);
  if (!spec.ok()) return new Refused(ToGrpcStatus(spec.status()));
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
