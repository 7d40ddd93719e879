// The architecture registry: name -> builder. A builder reads the architecture's config
// (config.json of a Hugging Face directory, or what the checkpoint's keys and shapes imply) and
// builds the model's skeleton on meta, ready for the loader.
//
//   mlp          configurable layer sizes and activation; entry "forward": input -> output
//   gpt2         GPT2LMHeadModel layout; entry "forward": input_ids [, attention_mask] -> logits
//   llama        LlamaForCausalLM layout; same entry
//   sd1          Stable Diffusion 1.x single-file checkpoint (LDM keys; also -inpainting and
//                -instruct-pix2pix); entries unet, text_encoder, vae_decode, vae_encode
//   torchscript  any torch.jit.save archive; entry "forward" from its schema, inputs by position
//
// Stateless and thread-safe.
#ifndef METALOAD_SERVER_MODELS_REGISTRY_H_
#define METALOAD_SERVER_MODELS_REGISTRY_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/core/checkpoint.h"
#include "server/models/model.h"

namespace metaload::models {

// Known architecture names, sorted.
std::vector<std::string> ArchitectureNames();

// Builds the skeleton of `architecture` ("" = detect, see architecture_detector.h) for the
// checkpoint described by `index`. FAILED_PRECONDITION naming what was seen for an unknown,
// ambiguous or unsupported checkpoint (e.g. "detected sdxl; not supported yet"), or a config
// that does not fit the checkpoint.
absl::StatusOr<std::unique_ptr<Model>> BuildModel(const std::string& architecture,
                                                  const core::CheckpointIndex& index);

}  // namespace metaload::models

#endif  // METALOAD_SERVER_MODELS_REGISTRY_H_
