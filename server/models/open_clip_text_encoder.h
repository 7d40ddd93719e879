// The OpenCLIP text encoder (open_clip's TextTransformer, as SD2's FrozenOpenCLIPEmbedder holds
// it under "cond_stage_model.model.") as a layer-kit module tree with open_clip's tensor names:
//
//   token_embedding, positional_embedding
//   transformer.resblocks.N.{ln_1, attn.in_proj_weight/in_proj_bias (q, k, v fused, as
//                            torch.nn.MultiheadAttention), attn.out_proj, ln_2, mlp.c_fc,
//                            mlp.c_proj}
//   ln_final [, text_projection, logit_scale]
//
// Pre-norm blocks, causal self-attention in heads of 64 channels, exact GELU. Forward gives the
// hidden states the web UI conditions SD2 on: those of the penultimate layer, through ln_final
// (ldm's layer="penultimate"). SDXL's bigG encoder is this one with its penultimate states
// taken without ln_final and a pooled output through text_projection (ForwardSdxl).
// Every size is an OpenClipConfig field, read from the keys (ldm_keys.h). Built on meta like
// any module (meta_module_model.h); the model that holds it owns it. Forward is const:
// concurrent forwards on a loaded encoder are safe.
#ifndef METALOAD_SERVER_MODELS_OPEN_CLIP_TEXT_ENCODER_H_
#define METALOAD_SERVER_MODELS_OPEN_CLIP_TEXT_ENCODER_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "server/core/layers.h"

namespace metaload::models {

struct OpenClipConfig {
  int64_t vocab = 0;      // token embedding rows (49408)
  int64_t positions = 0;  // positional embedding rows: the longest input (77)
  int64_t width = 0;      // ViT-H/14: 1024
  int64_t layers = 0;     // resblocks in the file
  int64_t heads = 0;      // width / 64 (ViT-H/14: 16)
  int64_t ffn = 0;        // mlp.c_fc rows (4096)
  // Resblocks run before ln_final: the penultimate layer's output, layers - 1, unless the file
  // already omits the last resblock (ldm_keys.h says how that is told).
  int64_t output_layer = 0;
  int64_t projection = 0;    // text_projection columns; 0: the file has none
  bool logit_scale = false;  // the file holds CLIP's logit_scale (unused by the entries)
};

class OpenClipBlock;  // transformer.resblocks.N (open_clip_text_encoder.cc)

class OpenClipTextEncoder : public core::Module {
 public:
  explicit OpenClipTextEncoder(const OpenClipConfig& config);

  // ids [B, T] int64, T <= positions, every id < vocab -> [B, T, width]: ln_final of the
  // output of the first output_layer resblocks.
  at::Tensor Forward(const at::Tensor& ids) const;

  // SDXL's use (sgm's FrozenOpenCLIPEmbedder2, layer "penultimate", legacy off): the input of
  // the last resblock [B, T, width], and the pooled output [B, projection]: ln_final of the last
  // resblock's output at each row's highest token id (the end-of-text token), through
  // text_projection. Needs every resblock and a text_projection.
  struct SdxlOutputs {
    at::Tensor penultimate, pooled;
  };
  SdxlOutputs ForwardSdxl(const at::Tensor& ids) const;

  const OpenClipConfig& config() const { return c_; }

 private:
  // Token embeddings plus positions: what the first block takes.
  at::Tensor Embed(const at::Tensor& ids) const;

  OpenClipConfig c_;
  core::Embedding& tokens_;
  at::Tensor& positions_;
  std::vector<const OpenClipBlock*> blocks_;
  core::LayerNorm* final_norm_ = nullptr;
  at::Tensor* projection_ = nullptr;
};

}  // namespace metaload::models

#endif  // METALOAD_SERVER_MODELS_OPEN_CLIP_TEXT_ENCODER_H_
