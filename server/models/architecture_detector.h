// Names the architecture of a checkpoint from its index: config.json's model_type /
// architectures when the checkpoint has one, else the tell-tale keys and shapes, the way the
// web UI guesses Stable Diffusion configs. Stateless and thread-safe.
#ifndef METALOAD_SERVER_MODELS_ARCHITECTURE_DETECTOR_H_
#define METALOAD_SERVER_MODELS_ARCHITECTURE_DETECTOR_H_

#include <string>

#include "server/core/checkpoint.h"

namespace metaload::models {

struct DetectedArchitecture {
  // "mlp", "gpt2", "llama", "torchscript", "sd1", "sd1-inpainting", "sd1-instruct-pix2pix",
  // "sd2", "sdxl"; empty when nothing matched.
  std::string name;
  // How it was decided, for messages: "config.json model_type", "keys", "format".
  std::string evidence;
};

DetectedArchitecture DetectArchitecture(const core::CheckpointIndex& index);

}  // namespace metaload::models

#endif  // METALOAD_SERVER_MODELS_ARCHITECTURE_DETECTOR_H_
