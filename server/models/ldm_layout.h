// The names of the original Stable Diffusion single-file layout (CompVis ldm's LatentDiffusion
// state dict, the web UI's payload), in one place for everything that writes, detects or
// reads such a checkpoint: architecture_detector.cc, synth_presets.cc, ldm_keys.cc, sd1.cc.
//
//   model.diffusion_model.                    UNet (ldm's UNetModel)
//   first_stage_model.                        AutoencoderKL
//   cond_stage_model.transformer.text_model.  CLIP ViT-L/14 text encoder (SD1; "text_model." is
//                                             missing in older checkpoints)
//   betas, alphas_cumprod, ...                the DDPM noise schedule
//
// Constants only: LibTorch-free, no state, usable from any thread.
#ifndef METALOAD_SERVER_MODELS_LDM_LAYOUT_H_
#define METALOAD_SERVER_MODELS_LDM_LAYOUT_H_

#include <cstdint>

namespace metaload::models {

inline constexpr char kLdmUnet[] = "model.diffusion_model.";
inline constexpr char kLdmVae[] = "first_stage_model.";
inline constexpr char kLdmTextEncoders[] = "cond_stage_model.";
inline constexpr char kLdmClip[] = "cond_stage_model.transformer.text_model.";
inline constexpr char kLdmClipShort[] = "cond_stage_model.transformer.";

// What LatentDiffusion registers for its noise schedule: 1-D buffers of one value per step.
inline constexpr const char* kLdmScheduleBuffers[] = {"betas",
                                                      "alphas_cumprod",
                                                      "alphas_cumprod_prev",
                                                      "sqrt_alphas_cumprod",
                                                      "sqrt_one_minus_alphas_cumprod",
                                                      "log_one_minus_alphas_cumprod",
                                                      "sqrt_recip_alphas_cumprod",
                                                      "sqrt_recipm1_alphas_cumprod",
                                                      "posterior_variance",
                                                      "posterior_log_variance_clipped",
                                                      "posterior_mean_coef1",
                                                      "posterior_mean_coef2"};

// The SD1 variants, told apart by the UNet's input channels as the web UI does (the plain
// model's UNet takes the 4 latent channels). They load with the same builder.
struct Sd1Variant {
  const char* name;
  int64_t unet_in_channels;
  const char* description;
};
inline constexpr int64_t kSd1UnetInChannels = 4;
inline constexpr Sd1Variant kSd1Variants[] = {
    {"sd1-inpainting", 9, "UNet input: latents, mask and masked-image latents (9 channels)"},
    {"sd1-instruct-pix2pix", 8, "UNet input: latents and the input image's latents (8 channels)"},
};

// "sd1", or the variant whose UNet takes `unet_in_channels`.
inline const char* Sd1VariantName(int64_t unet_in_channels) {
  for (const Sd1Variant& v : kSd1Variants) {
    if (v.unet_in_channels == unet_in_channels) return v.name;
  }
  return "sd1";
}

}  // namespace metaload::models

#endif  // METALOAD_SERVER_MODELS_LDM_LAYOUT_H_
