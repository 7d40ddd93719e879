#include "server/models/open_clip_text_encoder.h"

#include <ATen/ATen.h>

#include <memory>

#include "absl/strings/str_cat.h"
#include "server/models/attention_heads.h"

namespace metaload::models {

using core::LayerNorm;
using core::Linear;

// One pre-norm resblock: causal self-attention with fused q/k/v, then the GELU MLP.
class OpenClipBlock : public core::Module {
 public:
  explicit OpenClipBlock(const OpenClipConfig& c)
      : heads_(c.heads),
        norm1_(AddChild("ln_1", std::make_unique<LayerNorm>(c.width))),
        in_proj_(AddWeight("attn.in_proj_weight", {3 * c.width, c.width}, nullptr,
                           core::TensorUse::kMatmulWeight)),
        in_bias_(AddWeight("attn.in_proj_bias", {3 * c.width}, nullptr, core::TensorUse::kWeight)),
        out_(AddChild("attn.out_proj", std::make_unique<Linear>(c.width, c.width))),
        norm2_(AddChild("ln_2", std::make_unique<LayerNorm>(c.width))),
        fc_(AddChild("mlp.c_fc", std::make_unique<Linear>(c.width, c.ffn))),
        proj_(AddChild("mlp.c_proj", std::make_unique<Linear>(c.ffn, c.width))) {}

  at::Tensor Forward(const at::Tensor& x) const {
    std::vector<at::Tensor> qkv =
        at::linear(norm1_.Forward(x), Weight(in_proj_), Weight(in_bias_)).chunk(3, -1);
    at::Tensor a = core::ScaledDotProductAttention(
        SplitHeads(qkv[0], heads_), SplitHeads(qkv[1], heads_), SplitHeads(qkv[2], heads_),
        /*causal=*/true, at::Tensor());
    at::Tensor y = x + out_.Forward(MergeHeads(a));
    return y + proj_.Forward(at::gelu(fc_.Forward(norm2_.Forward(y))));
  }

 private:
  int64_t heads_;
  LayerNorm& norm1_;
  at::Tensor& in_proj_;
  at::Tensor& in_bias_;
  Linear& out_;
  LayerNorm& norm2_;
  Linear& fc_;
  Linear& proj_;
};

OpenClipTextEncoder::OpenClipTextEncoder(const OpenClipConfig& c)
    : c_(c),
      tokens_(AddChild("token_embedding", std::make_unique<core::Embedding>(c.vocab, c.width))),
      positions_(AddWeight("positional_embedding", {c.positions, c.width}, nullptr,
                           core::TensorUse::kWeight)) {
  for (int64_t i = 0; i < c.layers; ++i) {
    blocks_.push_back(
        &AddChild(absl::StrCat("transformer.resblocks.", i), std::make_unique<OpenClipBlock>(c)));
  }
  final_norm_ = &AddChild("ln_final", std::make_unique<LayerNorm>(c.width));
  if (c.projection > 0) {
    projection_ = &AddWeight("text_projection", {c.width, c.projection}, nullptr,
                             core::TensorUse::kMatmulWeight);
  }
  if (c.logit_scale) AddParameter("logit_scale", {}, nullptr);
}

at::Tensor OpenClipTextEncoder::Embed(const at::Tensor& ids) const {
  return tokens_.Forward(ids) + Weight(positions_).slice(0, 0, ids.size(1)).unsqueeze(0);
}

at::Tensor OpenClipTextEncoder::Forward(const at::Tensor& ids) const {
  at::Tensor x = Embed(ids);
  for (int64_t i = 0; i < c_.output_layer; ++i) x = blocks_[i]->Forward(x);
  return final_norm_->Forward(x);
}

OpenClipTextEncoder::SdxlOutputs OpenClipTextEncoder::ForwardSdxl(const at::Tensor& ids) const {
  at::Tensor x = Embed(ids);
  SdxlOutputs out;
  for (size_t i = 0; i < blocks_.size(); ++i) {
    if (i + 1 == blocks_.size()) out.penultimate = x;
    x = blocks_[i]->Forward(x);
  }
  // The end token of each row (the largest id), then ln_final: it normalises each token on its
  // own, so norming the B gathered rows gives what norming all B x T tokens would.
  at::Tensor end = ids.argmax(-1).view({ids.size(0), 1, 1}).expand({ids.size(0), 1, c_.width});
  out.pooled = at::matmul(final_norm_->Forward(x.gather(1, end).squeeze(1)), Weight(*projection_));
  return out;
}

}  // namespace metaload::models
