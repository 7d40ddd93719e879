// The architecture registry: builds a model's skeleton for a checkpoint. A builder reads the
// architecture's config (config.json of a Hugging Face directory, or what the checkpoint's keys
// and shapes imply) and builds the model on meta (meta_module_model.h), ready for the loader.
// Which architectures there are, their variants and entries: the architecture table
// (architectures.h), from which every name list here derives.
//
// Stateless and thread-safe.
#ifndef METALOAD_SERVER_MODELS_REGISTRY_H_
#define METALOAD_SERVER_MODELS_REGISTRY_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/core/checkpoint.h"
#include "server/models/architectures.h"  // ArchitectureNames()
#include "server/models/model.h"

namespace metaload::models {

// Builds the skeleton of `architecture` ("" = detect, see architecture_detector.h) for the
// checkpoint described by `index`. FAILED_PRECONDITION naming what was seen for an unknown,
// ambiguous or unsupported checkpoint (e.g. "detected sdxl; not supported yet"), or a config
// that does not fit the checkpoint.
absl::StatusOr<std::unique_ptr<Model>> BuildModel(const std::string& architecture,
                                                  const core::CheckpointIndex& index);

// The table rows that have a builder, sorted (RegistryTest: exactly the loadable rows).
std::vector<std::string> BuiltArchitectures();

}  // namespace metaload::models

#endif  // METALOAD_SERVER_MODELS_REGISTRY_H_
