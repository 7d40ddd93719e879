// What a caller's sampler must know about a loaded diffusion model and cannot read from its
// entries: what the UNet predicts and the VAE's latent scale. LibTorch-free, a value type.
#ifndef METALOAD_SERVER_MODELS_DIFFUSION_INFO_H_
#define METALOAD_SERVER_MODELS_DIFFUSION_INFO_H_

#include <string>

namespace metaload::models {

struct DiffusionInfo {
  // "epsilon" (the noise) or "v" (v-prediction, SD 2.x 768-v): the UNet's output.
  std::string prediction;
  // How it was decided: "request", "architecture: ..." or "weights: ..." (the statistic read).
  std::string prediction_source;
  // Latents = scale x the VAE encoder's mean; decode latents / scale.
  double vae_scale_factor = 0;
};

// The prediction names a request may give; "" keeps the model's.
inline bool IsPredictionName(const std::string& name) { return name == "epsilon" || name == "v"; }

}  // namespace metaload::models

#endif  // METALOAD_SERVER_MODELS_DIFFUSION_INFO_H_
