// The LDM UNet (ldm's openaimodel.UNetModel) as a layer-kit module tree whose tensor names are
// ldm's, so a checkpoint's "model.diffusion_model." keys map onto it directly:
//
//   time_embed.{0,2}                 timestep MLP
//   input_blocks.0.0                 stem convolution
//   input_blocks.N.{0,1}             per level: res_blocks x (ResBlock [+ SpatialTransformer]),
//                                    then a Downsample (N.0.op) below every level but the last
//   middle_block.{0,1,2}             ResBlock, SpatialTransformer, ResBlock
//   output_blocks.N.{0,1,2}          per level, lowest first: res_blocks + 1 x (ResBlock on the
//                                    skip concatenation [+ SpatialTransformer] [+ Upsample])
//   out.{0,2}                        GroupNorm, convolution
//
// Every size is a UnetConfig field, read from the checkpoint's keys (ldm_keys.h). Built on meta
// like any module (meta_module_model.h); the model that holds it owns it. Forward is const:
// concurrent forwards on a loaded UNet are safe.
#ifndef METALOAD_SERVER_MODELS_LDM_UNET_H_
#define METALOAD_SERVER_MODELS_LDM_UNET_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "server/core/layers.h"

namespace metaload::models {

// ldm's (and sgm's) UNetModel arguments as SD1, SD2 and SDXL use them.
struct UnetConfig {
  int64_t in_channels = 0;     // of x: 4 latents (9 inpainting, 8 instruct-pix2pix)
  int64_t out_channels = 0;    // of eps
  int64_t model_channels = 0;  // width of the first level; a multiple of 32 (GroupNorm groups)
  int64_t res_blocks = 0;      // ResBlocks per level on the way down (one more on the way up)
  // Attention heads: a fixed count in every SpatialTransformer (ldm's num_heads; SD1: 8), or,
  // when head_channels is set, as many heads of that width as the block's channels hold
  // (num_head_channels; SD2: 64, so 5, 10 and 20 heads at 320, 640 and 1280 channels). No shape
  // tells either: the assembler states it (ldm_keys.h).
  int64_t heads = 0;
  int64_t head_channels = 0;
  // proj_in / proj_out of the SpatialTransformers as Linear layers on the flattened tokens
  // (use_linear_in_transformer, SD2 and SDXL) instead of 1x1 convolutions (SD1): read from the
  // rank of proj_in.weight.
  bool linear_proj = false;
  int64_t context_dim = 0;      // width of the cross-attention context (SD1: CLIP's 768)
  std::vector<int64_t> mult;    // per level: width / model_channels
  std::vector<bool> attention;  // per level: whether its blocks have a SpatialTransformer
  // Per level: transformer blocks in each of its SpatialTransformers (SD1, SD2: 1; SDXL base:
  // 0, 2, 10), and in the middle block's.
  std::vector<int64_t> depth;
  int64_t middle_depth = 0;
  // SDXL's label_emb: an MLP from the class vector y (pooled text embedding and size
  // embeddings, 2816 wide in the base) added to the time embedding. 0: none (SD1, SD2).
  int64_t adm_in_channels = 0;

  // Height and width of x must be multiples of this: one halving per level below the first.
  int64_t Downscale() const { return int64_t{1} << (mult.size() - 1); }
  // The heads of a SpatialTransformer with `channels` channels.
  int64_t HeadsAt(int64_t channels) const {
    return head_channels > 0 ? channels / head_channels : heads;
  }
};

class UnetBlock;  // input_blocks.N, middle_block, output_blocks.N (ldm_unet.cc)

class Unet : public core::Module {
 public:
  explicit Unet(const UnetConfig& config);

  // x [B, in_channels, H, W] (H, W multiples of Downscale()), timesteps [B] (any integer or
  // floating type), context [B, T, context_dim], y [B, adm_in_channels] (undefined without a
  // label_emb) -> the prediction [B, out_channels, H, W].
  at::Tensor Forward(const at::Tensor& x, const at::Tensor& timesteps, const at::Tensor& context,
                     const at::Tensor& y = at::Tensor()) const;

  const UnetConfig& config() const { return c_; }

 private:
  UnetConfig c_;
  core::Linear& time_in_;
  core::Linear& time_out_;
  core::Linear* label_in_ = nullptr;
  core::Linear* label_out_ = nullptr;
  std::vector<const UnetBlock*> inputs_;
  const UnetBlock* middle_ = nullptr;
  std::vector<const UnetBlock*> outputs_;
  core::GroupNorm* out_norm_ = nullptr;
  core::Conv2d* out_conv_ = nullptr;
};

}  // namespace metaload::models

#endif  // METALOAD_SERVER_MODELS_LDM_UNET_H_
