// metaload.v1.ModelLoader over gRPC's callback API: handlers never block a gRPC thread. Loads
// and Infers run on the model cache's pools and finish their RPCs from there; the quick RPCs
// (Get, List, Unload) answer inline.
//
// Every RPC checks, in order: draining (UNAVAILABLE), the bearer token when one is configured
// (UNAUTHENTICATED), then the request (INVALID_ARGUMENT naming the field). Errors from the
// layers below become gRPC statuses in ToGrpcStatus only.
//
// The service does not own the cache. Thread-safe.
#ifndef METALOAD_SERVER_SERVICE_MODEL_LOADER_SERVICE_H_
#define METALOAD_SERVER_SERVICE_MODEL_LOADER_SERVICE_H_

#include <atomic>
#include <string>

#include "metaload/v1/metaload.grpc.pb.h"
#include "server/cache/model_cache.h"
#include "server/service/path_resolver.h"

namespace metaload::service {

class ModelLoaderService final : public metaload::v1::ModelLoader::CallbackService {
 public:
  struct Options {
    // Bearer token required on every RPC; empty: no authentication.
    std::string auth_token;
  };

  ModelLoaderService(cache::ModelCache* cache, const PathResolver* resolver, Options options)
      : cache_(cache), resolver_(resolver), options_(std::move(options)) {}

  // New calls get UNAVAILABLE from now on.
  void SetDraining() { draining_.store(true); }

  grpc::ServerUnaryReactor* LoadModel(grpc::CallbackServerContext* context,
                                      const metaload::v1::LoadModelRequest* request,
                                      metaload::v1::LoadModelResponse* response) override;
  grpc::ServerWriteReactor<metaload::v1::LoadEvent>* LoadModelStream(
      grpc::CallbackServerContext* context, const metaload::v1::LoadModelRequest* request) override;
  grpc::ServerUnaryReactor* UnloadModel(grpc::CallbackServerContext* context,
                                        const metaload::v1::UnloadModelRequest* request,
                                        metaload::v1::UnloadModelResponse* response) override;
  grpc::ServerUnaryReactor* GetModel(grpc::CallbackServerContext* context,
                                     const metaload::v1::GetModelRequest* request,
                                     metaload::v1::ModelInfo* response) override;
  grpc::ServerUnaryReactor* ListModels(grpc::CallbackServerContext* context,
                                       const metaload::v1::ListModelsRequest* request,
                                       metaload::v1::ListModelsResponse* response) override;
  grpc::ServerUnaryReactor* Infer(grpc::CallbackServerContext* context,
                                  const metaload::v1::InferRequest* request,
                                  metaload::v1::InferResponse* response) override;

 private:
  // OK, or UNAVAILABLE / UNAUTHENTICATED.
  grpc::Status Admit(grpc::CallbackServerContext* context) const;

  cache::ModelCache* cache_;
  const PathResolver* resolver_;
  Options options_;
  std::atomic<bool> draining_{false};
};

}  // namespace metaload::service

#endif  // METALOAD_SERVER_SERVICE_MODEL_LOADER_SERVICE_H_
