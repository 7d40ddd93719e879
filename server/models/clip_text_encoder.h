// The CLIP text encoder (transformers' CLIPTextTransformer, as SD1's FrozenCLIPEmbedder holds
// it) as a layer-kit module tree with transformers' tensor names:
//
//   embeddings.token_embedding, embeddings.position_embedding [, embeddings.position_ids]
//   encoder.layers.N.{self_attn.{q,k,v,out}_proj, layer_norm1, mlp.fc1, mlp.fc2, layer_norm2}
//   final_layer_norm
//
// Pre-norm layers, causal self-attention, quick_gelu. SDXL's first text encoder is this one
// (its hidden states from the penultimate layer, HiddenStates); SD2's OpenCLIP encoder has
// another layout (open_clip_text_encoder.h). Every size is a ClipConfig field, read from the keys
// (ldm_keys.h). Built on meta like any module (meta_module_model.h); the model that holds it
// owns it. Forward is const: concurrent forwards on a loaded encoder are safe.
#ifndef METALOAD_SERVER_MODELS_CLIP_TEXT_ENCODER_H_
#define METALOAD_SERVER_MODELS_CLIP_TEXT_ENCODER_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "server/core/layers.h"

namespace metaload::models {

struct ClipConfig {
  int64_t vocab = 0;      // token embedding rows (49408)
  int64_t positions = 0;  // position embedding rows: the longest input (77)
  int64_t width = 0;      // hidden size (ViT-L/14: 768)
  int64_t layers = 0;     // encoder layers (12)
  int64_t heads = 0;      // attention heads (ViT-L/14: 12, of 64 channels each)
  int64_t ffn = 0;        // MLP hidden size (3072)
};

class ClipLayer;  // encoder.layers.N (clip_text_encoder.cc)

class ClipTextEncoder : public core::Module {
 public:
  // `position_ids_shape`: the shape of the checkpoint's embeddings.position_ids buffer, kept
  // when present (merged checkpoints may hold broken ones, so positions are computed instead);
  // empty when the checkpoint has none.
  ClipTextEncoder(const ClipConfig& config, const std::vector<int64_t>& position_ids_shape);

  // ids [B, T] int64, T <= positions, every id < vocab -> last_hidden_state [B, T, width].
  at::Tensor Forward(const at::Tensor& ids) const;
  // The output of the first `layers` layers, without the final layer norm (transformers'
  // hidden_states[layers]; SDXL conditions on hidden_states[-2], layers - 1).
  at::Tensor HiddenStates(const at::Tensor& ids, int64_t layers) const;

  const ClipConfig& config() const { return c_; }

 private:
  ClipConfig c_;
  core::Embedding& tokens_;
  core::Embedding& positions_;
  std::vector<const ClipLayer*> layers_;
  core::LayerNorm* final_norm_ = nullptr;
};

}  // namespace metaload::models

#endif  // METALOAD_SERVER_MODELS_CLIP_TEXT_ENCODER_H_
