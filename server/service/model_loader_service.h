// metaload.v1.ModelLoader over gRPC's callback API: handlers never block a reactor thread.
//
// The RPCs are registered but answer UNIMPLEMENTED until the model cache lands; the daemon still
// lists the service through reflection, so clients can be written against the full contract.
// Thread-safe.
#ifndef METALOAD_SERVER_SERVICE_MODEL_LOADER_SERVICE_H_
#define METALOAD_SERVER_SERVICE_MODEL_LOADER_SERVICE_H_

#include "metaload/v1/metaload.grpc.pb.h"

namespace metaload::service {

class ModelLoaderService final : public metaload::v1::ModelLoader::CallbackService {};

}  // namespace metaload::service

#endif  // METALOAD_SERVER_SERVICE_MODEL_LOADER_SERVICE_H_
