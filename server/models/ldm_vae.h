// The LDM AutoencoderKL (ldm's diffusionmodules.model Encoder/Decoder and
// models.autoencoder.AutoencoderKL) as a layer-kit module tree with ldm's tensor names, so a
// checkpoint's "first_stage_model." keys map onto it directly:
//
//   encoder.conv_in, encoder.down.L.block.R, encoder.down.L.downsample.conv,
//   encoder.mid.{block_1,attn_1,block_2}, encoder.norm_out, encoder.conv_out
//   decoder.conv_in, decoder.mid.*, decoder.up.L.block.R (res_blocks + 1 per level),
//   decoder.up.L.upsample.conv, decoder.norm_out, decoder.conv_out
//   quant_conv, post_quant_conv
//
// SD1, SD2 and SDXL share this VAE. Every size is a VaeConfig field, read from the keys
// (ldm_keys.h). Built on meta like any module (meta_module_model.h); the model that holds it
// owns it. Encode and Decode are const: concurrent calls on a loaded VAE are safe.
#ifndef METALOAD_SERVER_MODELS_LDM_VAE_H_
#define METALOAD_SERVER_MODELS_LDM_VAE_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "server/core/layers.h"

namespace metaload::models {

struct VaeConfig {
  int64_t in_channels = 0;    // of the image (3)
  int64_t out_channels = 0;   // of the decoded image (3)
  int64_t ch = 0;             // width of the first level; a multiple of 32 (GroupNorm groups)
  int64_t res_blocks = 0;     // res blocks per encoder level (the decoder has one more)
  int64_t z_channels = 0;     // of the decoder's input (the encoder emits twice: mean, logvar)
  int64_t embed_dim = 0;      // of the latents between quant_conv and post_quant_conv (4)
  std::vector<int64_t> mult;  // per level: width / ch
};

class VaeEncoder;  // encoder.* (ldm_vae.cc)
class VaeDecoder;  // decoder.*

class Vae : public core::Module {
 public:
  explicit Vae(const VaeConfig& config);

  // image [B, in_channels, H, W] (H, W multiples of 2^(levels - 1)) -> the posterior's mean
  // [B, embed_dim, H / 2^(levels - 1), W / ...], unscaled (the UNet works on it x 0.18215).
  at::Tensor Encode(const at::Tensor& image) const;
  // latents [B, embed_dim, h, w] -> image [B, out_channels, h * 2^(levels - 1), ...].
  at::Tensor Decode(const at::Tensor& latents) const;

  const VaeConfig& config() const { return c_; }

 private:
  VaeConfig c_;
  VaeEncoder& encoder_;
  VaeDecoder& decoder_;
  core::Conv2d& quant_;
  core::Conv2d& post_quant_;
};

}  // namespace metaload::models

#endif  // METALOAD_SERVER_MODELS_LDM_VAE_H_
