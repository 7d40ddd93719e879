#include "server/models/clip_text_encoder.h"

#include <ATen/ATen.h>

#include <memory>

#include "absl/strings/str_cat.h"
#include "server/models/attention_heads.h"

namespace metaload::models {
namespace {

using core::LayerNorm;
using core::Linear;

}  // namespace

// One pre-norm layer: causal self-attention, then the quick_gelu MLP.
class ClipLayer : public core::Module {
 public:
  explicit ClipLayer(const ClipConfig& c)
      : heads_(c.heads),
        q_(AddChild("self_attn.q_proj", std::make_unique<Linear>(c.width, c.width))),
        k_(AddChild("self_attn.k_proj", std::make_unique<Linear>(c.width, c.width))),
        v_(AddChild("self_attn.v_proj", std::make_unique<Linear>(c.width, c.width))),
        out_(AddChild("self_attn.out_proj", std::make_unique<Linear>(c.width, c.width))),
        norm1_(AddChild("layer_norm1", std::make_unique<LayerNorm>(c.width))),
        fc1_(AddChild("mlp.fc1", std::make_unique<Linear>(c.width, c.ffn))),
        fc2_(AddChild("mlp.fc2", std::make_unique<Linear>(c.ffn, c.width))),
        norm2_(AddChild("layer_norm2", std::make_unique<LayerNorm>(c.width))) {}
  at::Tensor Forward(const at::Tensor& x) const {
    at::Tensor h = norm1_.Forward(x);
    at::Tensor a = core::ScaledDotProductAttention(SplitHeads(q_.Forward(h), heads_),
                                                   SplitHeads(k_.Forward(h), heads_),
                                                   SplitHeads(v_.Forward(h), heads_),
                                                   /*causal=*/true, at::Tensor());
    at::Tensor y = x + out_.Forward(MergeHeads(a));
    at::Tensor m = fc1_.Forward(norm2_.Forward(y));
    m = m * at::sigmoid(1.702 * m);  // quick_gelu
    return y + fc2_.Forward(m);
  }

 private:
  int64_t heads_;
  Linear& q_;
  Linear& k_;
  Linear& v_;
  Linear& out_;
  LayerNorm& norm1_;
  Linear& fc1_;
  Linear& fc2_;
  LayerNorm& norm2_;
};

ClipTextEncoder::ClipTextEncoder(const ClipConfig& c,
                                 const std::vector<int64_t>& position_ids_shape)
    : c_(c),
      tokens_(AddChild("embeddings.token_embedding",
                       std::make_unique<core::Embedding>(c.vocab, c.width))),
      positions_(AddChild("embeddings.position_embedding",
                          std::make_unique<core::Embedding>(c.positions, c.width))) {
  if (!position_ids_shape.empty()) {
    AddBuffer("embeddings.position_ids", position_ids_shape, nullptr, at::kLong);
  }
  for (int64_t i = 0; i < c.layers; ++i) {
    layers_.push_back(
        &AddChild(absl::StrCat("encoder.layers.", i), std::make_unique<ClipLayer>(c)));
  }
  final_norm_ = &AddChild("final_layer_norm", std::make_unique<LayerNorm>(c.width));
}

at::Tensor ClipTextEncoder::HiddenStates(const at::Tensor& ids, int64_t layers) const {
  at::Tensor positions = at::arange(ids.size(1), ids.options());
  at::Tensor x = tokens_.Forward(ids) + positions_.Forward(positions).unsqueeze(0);
  for (int64_t i = 0; i < layers; ++i) x = layers_[static_cast<size_t>(i)]->Forward(x);
  return x;
}

at::Tensor ClipTextEncoder::Forward(const at::Tensor& ids) const {
  return final_norm_->Forward(HiddenStates(ids, c_.layers));
}

}  // namespace metaload::models
