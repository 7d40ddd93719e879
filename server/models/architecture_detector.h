// Names the architecture of a checkpoint from its index: config.json's model_type /
// architectures as the architecture table (architectures.h) lists them, else the tell-tale
// keys and shapes, the way the web UI guesses Stable Diffusion configs. The keys are tried in
// an order that matters (SDXL before SD2 before SD1, whose UNet keys they share), so they are
// code here, not table columns; every name returned is a table row's name or variant
// (RegistryTest checks it for every row). Stateless and thread-safe.
#ifndef METALOAD_SERVER_MODELS_ARCHITECTURE_DETECTOR_H_
#define METALOAD_SERVER_MODELS_ARCHITECTURE_DETECTOR_H_

#include <string>

#include "server/core/checkpoint.h"

namespace metaload::models {

struct DetectedArchitecture {
  // A row's name or variant name (architectures.h); empty when nothing matched.
  std::string name;
  // How it was decided, for messages: "config.json model_type", "keys", "format".
  std::string evidence;
};

DetectedArchitecture DetectArchitecture(const core::CheckpointIndex& index);

}  // namespace metaload::models

#endif  // METALOAD_SERVER_MODELS_ARCHITECTURE_DETECTOR_H_
