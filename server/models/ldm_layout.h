// The names of the original Stable Diffusion single-file layout (CompVis ldm's LatentDiffusion
// state dict, the web UI's payload, SD1 and SD2), in one place for everything that writes,
// detects or reads such a checkpoint: architecture_detector.cc, synth_presets.cc, ldm_keys.cc,
// stable_diffusion.cc.
//
//   model.diffusion_model.                    UNet (ldm's UNetModel)
//   first_stage_model.                        AutoencoderKL
//   cond_stage_model.transformer.text_model.  SD1: CLIP ViT-L/14 text encoder ("text_model." is
//                                             missing in older checkpoints)
//   cond_stage_model.model.                   SD2: OpenCLIP ViT-H/14 text encoder (its visual
//                                             tower deleted, as ldm's FrozenOpenCLIPEmbedder does)
//   betas, alphas_cumprod, ...                the DDPM noise schedule
//
// Constants only: LibTorch-free, no state, usable from any thread.
#ifndef METALOAD_SERVER_MODELS_LDM_LAYOUT_H_
#define METALOAD_SERVER_MODELS_LDM_LAYOUT_H_

#include <cstddef>
#include <cstdint>

namespace metaload::models {

inline constexpr char kLdmUnet[] = "model.diffusion_model.";
inline constexpr char kLdmVae[] = "first_stage_model.";
inline constexpr char kLdmTextEncoders[] = "cond_stage_model.";
inline constexpr char kLdmClip[] = "cond_stage_model.transformer.text_model.";
inline constexpr char kLdmClipShort[] = "cond_stage_model.transformer.";
inline constexpr char kLdmOpenClip[] = "cond_stage_model.model.";

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

// The variants the web UI tells apart by the UNet's input channels (the plain model's UNet
// takes the 4 latent channels). A family's variants load with its builder.
struct LdmVariant {
  const char* name;
  int64_t unet_in_channels;
  const char* description;
};
inline constexpr int64_t kLdmUnetInChannels = 4;
inline constexpr LdmVariant kSd1Variants[] = {
    {"sd1-inpainting", 9, "UNet input: latents, mask and masked-image latents (9 channels)"},
    {"sd1-instruct-pix2pix", 8, "UNet input: latents and the input image's latents (8 channels)"},
};
inline constexpr LdmVariant kSd2Variants[] = {
    {"sd2-inpainting", 9, "UNet input: latents, mask and masked-image latents (9 channels)"},
};
// SD2's depth-to-image model: its UNet takes latents and a depth map (5 channels) that a MiDaS
// network under "depth_model." computes. Detected and named, not built.
inline constexpr char kSd2Depth[] = "sd2-depth";
inline constexpr int64_t kSd2DepthUnetInChannels = 5;
inline constexpr char kSd2DepthModel[] = "depth_model.";

// `family` ("sd1", "sd2"), or the name of its variant whose UNet takes `unet_in_channels`.
template <size_t N>
const char* LdmVariantName(const char* family, const LdmVariant (&variants)[N],
                           int64_t unet_in_channels) {
  for (const LdmVariant& v : variants) {
    if (v.unet_in_channels == unet_in_channels) return v.name;
  }
  return family;
}

// Diffusion families after SD2 and SDXL, told by a key (bare or under "model.diffusion_model.")
// that no SD1/SD2/SDXL file has, so none is mistaken for them: detected and named, not built.
struct NewerDiffusionFamily {
  const char* name;
  const char* marker;  // a key prefix
};
inline constexpr NewerDiffusionFamily kNewerDiffusionFamilies[] = {
    {"sd3", "joint_blocks."},             // SD3's MMDiT
    {"flux", "double_blocks."},           // Flux's double-stream blocks
    {"stable-cascade", "clf.1.weight"},   // Stable Cascade stage C's classifier head
    {"stable-cascade", "effnet_mapper."}  // and stage B's EfficientNet mapper
};

// SDXL's single file (Stability's sgm DiffusionEngine): the UNet and VAE under the LDM prefixes
// above, the text encoders under "conditioner.embedders.N.":
//   base:    0 = CLIP ViT-L/14 (transformers' layout under ".transformer.text_model."),
//            1 = OpenCLIP ViT-bigG/14 (open_clip's, under ".model.")
//   refiner: 0 = OpenCLIP ViT-bigG/14 alone
inline constexpr char kSgmEmbedders[] = "conditioner.embedders.";
inline constexpr char kSgmClip[] = "conditioner.embedders.0.transformer.text_model.";
inline constexpr char kSgmOpenClip[] = "conditioner.embedders.1.model.";
inline constexpr char kSgmRefinerOpenClip[] = "conditioner.embedders.0.model.";
inline constexpr char kSdxlRefiner[] = "sdxl-refiner";
inline constexpr LdmVariant kSdxlVariants[] = {
    {"sdxl-inpainting", 9, "UNet input: latents, mask and masked-image latents (9 channels)"},
};
// A v-prediction SDXL fine-tune says so with this key (as ComfyUI reads it); the base, the
// refiner and their usual fine-tunes predict the noise.
inline constexpr char kSdxlVPredictionKey[] = "v_pred";

// The VAE's latent scale (ldm's and sgm's scale_factor): what a caller multiplies encoded
// latents by and divides latents by before decoding.
inline constexpr double kSd1VaeScaleFactor = 0.18215;  // SD1 and SD2
inline constexpr double kSdxlVaeScaleFactor = 0.13025;

}  // namespace metaload::models

#endif  // METALOAD_SERVER_MODELS_LDM_LAYOUT_H_
