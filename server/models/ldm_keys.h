// Reading the sizes of the LDM networks from a checkpoint's keys and shapes, the way the web UI
// guesses a config: every UnetConfig, VaeConfig and ClipConfig field comes from the keys found
// under a prefix, except what no shape tells (the UNet's heads, CLIP's 64-wide heads, OpenCLIP's
// full depth), which the reader or the assembler states. A checkpoint that does not fit is
// FAILED_PRECONDITION naming the first missing key ("<path>: sd1 checkpoint lacks KEY") or what
// does not fit ("<path>: not an SD1 layout: UNet levels with different numbers of res blocks").
//
// Reads only the index (no tensor data). Stateless and thread-safe.
#ifndef METALOAD_SERVER_MODELS_LDM_KEYS_H_
#define METALOAD_SERVER_MODELS_LDM_KEYS_H_

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "server/core/checkpoint.h"
#include "server/models/clip_text_encoder.h"
#include "server/models/ldm_unet.h"
#include "server/models/ldm_vae.h"
#include "server/models/open_clip_text_encoder.h"

namespace metaload::models {

// One checkpoint as the readers see it.
struct LdmKeys {
  const core::CheckpointIndex& index;
  std::string family = "sd1";  // names the layout in messages
};

// Whether some key starts with `prefix`.
bool HasKeyPrefix(const core::CheckpointIndex& index, const std::string& prefix);

// FAILED_PRECONDITION "<path>: not an SD1 layout: <what>" (the family in capitals).
absl::Status NotLdmLayout(const LdmKeys& keys, const std::string& what);

// The UNet under `prefix` ("model.diffusion_model."): levels, res blocks per level and
// attention from the input blocks, transformer depth and context width from the middle block.
absl::StatusOr<UnetConfig> ReadUnet(const LdmKeys& keys, const std::string& prefix);
// The AutoencoderKL under `prefix` ("first_stage_model."): levels and res blocks from the
// encoder, channels from its convolutions.
absl::StatusOr<VaeConfig> ReadVae(const LdmKeys& keys, const std::string& prefix);
// The CLIP text encoder under `prefix` (".../text_model."), heads of 64 channels.
absl::StatusOr<ClipConfig> ReadClip(const LdmKeys& keys, const std::string& prefix);
// The OpenCLIP text encoder under `prefix` ("cond_stage_model.model."), heads of 64 channels.
// Its output layer is the penultimate one, counted in the architecture's full depth: open_clip's
// configs give ViT-H/14 (width 1024) 24 layers and ViT-bigG/14 (1280) 32, so a file of that
// width with one fewer resblock has left out the unused last one and runs all it holds. Any
// other width: the resblocks in the file are the full depth.
absl::StatusOr<OpenClipConfig> ReadOpenClip(const LdmKeys& keys, const std::string& prefix);

}  // namespace metaload::models

#endif  // METALOAD_SERVER_MODELS_LDM_KEYS_H_
