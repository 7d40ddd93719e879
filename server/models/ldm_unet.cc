#include "server/models/ldm_unet.h"

#include <ATen/ATen.h>

#include <cmath>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "server/models/attention_heads.h"

namespace metaload::models {
namespace {

using core::Conv2d;
using core::GroupNorm;
using core::LayerNorm;
using core::Linear;

at::Tensor Silu(const at::Tensor& x) { return at::silu(x); }

// One layer of a TimestepEmbedSequential: takes the time embedding and the context or not.
class UnetLayer : public core::Module {
 public:
  virtual at::Tensor Forward(const at::Tensor& x, const at::Tensor& emb,
                             const at::Tensor& context) const = 0;
};

// input_blocks.0.0: the stem convolution, its weights directly under the layer's name.
class ConvLayer : public UnetLayer {
 public:
  ConvLayer(int64_t in, int64_t out)
      : weight_(AddWeight("weight", {out, in, 3, 3}, nullptr, core::TensorUse::kMatmulWeight)),
        bias_(AddWeight("bias", {out}, nullptr, core::TensorUse::kWeight)) {}
  at::Tensor Forward(const at::Tensor& x, const at::Tensor&, const at::Tensor&) const override {
    return at::conv2d(x, Weight(weight_), Weight(bias_), {1, 1}, {1, 1});
  }

 private:
  at::Tensor& weight_;
  at::Tensor& bias_;
};

class ResBlock : public UnetLayer {
 public:
  ResBlock(int64_t in, int64_t out, int64_t emb)
      : in_norm_(AddChild("in_layers.0", std::make_unique<GroupNorm>(32, in, 1e-5, true))),
        in_conv_(AddChild("in_layers.2", std::make_unique<Conv2d>(in, out, 3, 1, 1))),
        emb_(AddChild("emb_layers.1", std::make_unique<Linear>(emb, out))),
        out_norm_(AddChild("out_layers.0", std::make_unique<GroupNorm>(32, out, 1e-5, true))),
        out_conv_(AddChild("out_layers.3", std::make_unique<Conv2d>(out, out, 3, 1, 1))) {
    if (in != out) skip_ = &AddChild("skip_connection", std::make_unique<Conv2d>(in, out, 1));
  }
  at::Tensor Forward(const at::Tensor& x, const at::Tensor& emb, const at::Tensor&) const override {
    at::Tensor h = in_conv_.Forward(Silu(in_norm_.Forward(x)));
    h = h + emb_.Forward(Silu(emb)).unsqueeze(-1).unsqueeze(-1);
    h = out_conv_.Forward(Silu(out_norm_.Forward(h)));
    return (skip_ != nullptr ? skip_->Forward(x) : x) + h;
  }

 private:
  GroupNorm& in_norm_;
  Conv2d& in_conv_;
  Linear& emb_;
  GroupNorm& out_norm_;
  Conv2d& out_conv_;
  Conv2d* skip_ = nullptr;
};

class CrossAttention : public core::Module {
 public:
  CrossAttention(int64_t dim, int64_t context_dim, int64_t heads)
      : heads_(heads),
        q_(AddChild("to_q", std::make_unique<Linear>(dim, dim, false))),
        k_(AddChild("to_k", std::make_unique<Linear>(context_dim, dim, false))),
        v_(AddChild("to_v", std::make_unique<Linear>(context_dim, dim, false))),
        out_(AddChild("to_out.0", std::make_unique<Linear>(dim, dim))) {}
  at::Tensor Forward(const at::Tensor& x, const at::Tensor& context) const {
    at::Tensor a = core::ScaledDotProductAttention(
        SplitHeads(q_.Forward(x), heads_), SplitHeads(k_.Forward(context), heads_),
        SplitHeads(v_.Forward(context), heads_), /*causal=*/false, at::Tensor());
    return out_.Forward(MergeHeads(a));
  }

 private:
  int64_t heads_;
  Linear& q_;
  Linear& k_;
  Linear& v_;
  Linear& out_;
};

class TransformerBlock : public core::Module {
 public:
  TransformerBlock(int64_t dim, int64_t context_dim, int64_t heads)
      : attn1_(AddChild("attn1", std::make_unique<CrossAttention>(dim, dim, heads))),
        ff_in_(AddChild("ff.net.0.proj", std::make_unique<Linear>(dim, 8 * dim))),
        ff_out_(AddChild("ff.net.2", std::make_unique<Linear>(4 * dim, dim))),
        attn2_(AddChild("attn2", std::make_unique<CrossAttention>(dim, context_dim, heads))),
        norm1_(AddChild("norm1", std::make_unique<LayerNorm>(dim))),
        norm2_(AddChild("norm2", std::make_unique<LayerNorm>(dim))),
        norm3_(AddChild("norm3", std::make_unique<LayerNorm>(dim))) {}
  at::Tensor Forward(const at::Tensor& x, const at::Tensor& context) const {
    at::Tensor h = norm1_.Forward(x);
    at::Tensor y = x + attn1_.Forward(h, h);
    y = y + attn2_.Forward(norm2_.Forward(y), context);
    std::vector<at::Tensor> geglu = ff_in_.Forward(norm3_.Forward(y)).chunk(2, -1);
    return y + ff_out_.Forward(geglu[0] * at::gelu(geglu[1]));
  }

 private:
  CrossAttention& attn1_;
  Linear& ff_in_;
  Linear& ff_out_;
  CrossAttention& attn2_;
  LayerNorm& norm1_;
  LayerNorm& norm2_;
  LayerNorm& norm3_;
};

// proj_in / proj_out: 1x1 convolutions on the image (SD1) or Linear layers on the flattened
// tokens (SD2, SDXL: use_linear_in_transformer); the same weights either way but for their rank.
class SpatialTransformer : public UnetLayer {
 public:
  SpatialTransformer(int64_t channels, int64_t depth, const UnetConfig& c)
      : linear_(c.linear_proj),
        norm_(AddChild("norm", std::make_unique<GroupNorm>(32, channels, 1e-6))) {
    if (linear_) {
      linear_in_ = &AddChild("proj_in", std::make_unique<Linear>(channels, channels));
    } else {
      conv_in_ = &AddChild("proj_in", std::make_unique<Conv2d>(channels, channels, 1));
    }
    for (int64_t d = 0; d < depth; ++d) {
      blocks_.push_back(&AddChild(
          absl::StrCat("transformer_blocks.", d),
          std::make_unique<TransformerBlock>(channels, c.context_dim, c.HeadsAt(channels))));
    }
    if (linear_) {
      linear_out_ = &AddChild("proj_out", std::make_unique<Linear>(channels, channels));
    } else {
      conv_out_ = &AddChild("proj_out", std::make_unique<Conv2d>(channels, channels, 1));
    }
  }
  at::Tensor Forward(const at::Tensor& x, const at::Tensor&,
                     const at::Tensor& context) const override {
    const int64_t b = x.size(0), ch = x.size(1), h = x.size(2), w = x.size(3);
    auto tokens = [&](const at::Tensor& image) {
      return image.permute({0, 2, 3, 1}).reshape({b, h * w, ch});
    };
    at::Tensor y = norm_.Forward(x);
    y = linear_ ? linear_in_->Forward(tokens(y)) : tokens(conv_in_->Forward(y));
    for (const TransformerBlock* block : blocks_) y = block->Forward(y, context);
    if (linear_) y = linear_out_->Forward(y);
    y = y.reshape({b, h, w, ch}).permute({0, 3, 1, 2});
    return x + (linear_ ? y : conv_out_->Forward(y));
  }

 private:
  bool linear_;
  GroupNorm& norm_;
  Conv2d* conv_in_ = nullptr;
  Conv2d* conv_out_ = nullptr;
  Linear* linear_in_ = nullptr;
  Linear* linear_out_ = nullptr;
  std::vector<const TransformerBlock*> blocks_;
};

class Downsample : public UnetLayer {
 public:
  explicit Downsample(int64_t ch)
      : op_(AddChild("op", std::make_unique<Conv2d>(ch, ch, 3, 2, 1))) {}
  at::Tensor Forward(const at::Tensor& x, const at::Tensor&, const at::Tensor&) const override {
    return op_.Forward(x);
  }

 private:
  Conv2d& op_;
};

// Nearest-neighbour x2, then a 3x3 convolution (the VAE has its own, as in ldm).
class Upsample : public UnetLayer {
 public:
  explicit Upsample(int64_t ch)
      : conv_(AddChild("conv", std::make_unique<Conv2d>(ch, ch, 3, 1, 1))) {}
  at::Tensor Forward(const at::Tensor& x) const {
    return conv_.Forward(
        at::upsample_nearest2d(x, std::vector<int64_t>{2 * x.size(2), 2 * x.size(3)}, 2.0, 2.0));
  }
  at::Tensor Forward(const at::Tensor& x, const at::Tensor&, const at::Tensor&) const override {
    return Forward(x);
  }

 private:
  Conv2d& conv_;
};

}  // namespace

// input_blocks.N / middle_block / output_blocks.N: layers named "0", "1", "2".
class UnetBlock : public core::Module {
 public:
  template <typename L>
  UnetBlock& Add(std::unique_ptr<L> layer) {
    layers_.push_back(&AddChild(std::to_string(layers_.size()), std::move(layer)));
    return *this;
  }
  at::Tensor Forward(at::Tensor x, const at::Tensor& emb, const at::Tensor& context) const {
    for (const UnetLayer* layer : layers_) x = layer->Forward(x, emb, context);
    return x;
  }

 private:
  std::vector<const UnetLayer*> layers_;
};

Unet::Unet(const UnetConfig& c)
    : c_(c),
      time_in_(AddChild("time_embed.0",
                        std::make_unique<Linear>(c.model_channels, 4 * c.model_channels))),
      time_out_(AddChild("time_embed.2",
                         std::make_unique<Linear>(4 * c.model_channels, 4 * c.model_channels))) {
  const int64_t emb = 4 * c.model_channels;
  if (c.adm_in_channels > 0) {
    label_in_ = &AddChild("label_emb.0.0", std::make_unique<Linear>(c.adm_in_channels, emb));
    label_out_ = &AddChild("label_emb.0.2", std::make_unique<Linear>(emb, emb));
  }
  auto block = [this](const std::string& name) -> UnetBlock& {
    return AddChild(name, std::make_unique<UnetBlock>());
  };
  int64_t ch = c.model_channels;
  std::vector<int64_t> skips = {ch};
  inputs_.push_back(&block("input_blocks.0").Add(std::make_unique<ConvLayer>(c.in_channels, ch)));
  const size_t levels = c.mult.size();
  for (size_t level = 0; level < levels; ++level) {
    for (int64_t r = 0; r < c.res_blocks; ++r) {
      UnetBlock& b = block(absl::StrCat("input_blocks.", inputs_.size()));
      const int64_t out = c.mult[level] * c.model_channels;
      b.Add(std::make_unique<ResBlock>(ch, out, emb));
      ch = out;
      if (c.attention[level]) {
        b.Add(std::make_unique<SpatialTransformer>(ch, c.depth[level], c));
      }
      inputs_.push_back(&b);
      skips.push_back(ch);
    }
    if (level + 1 < levels) {
      inputs_.push_back(&block(absl::StrCat("input_blocks.", inputs_.size()))
                             .Add(std::make_unique<Downsample>(ch)));
      skips.push_back(ch);
    }
  }
  middle_ = &block("middle_block")
                 .Add(std::make_unique<ResBlock>(ch, ch, emb))
                 .Add(std::make_unique<SpatialTransformer>(ch, c.middle_depth, c))
                 .Add(std::make_unique<ResBlock>(ch, ch, emb));
  for (size_t level = levels; level-- > 0;) {
    for (int64_t r = 0; r <= c.res_blocks; ++r) {
      UnetBlock& b = block(absl::StrCat("output_blocks.", outputs_.size()));
      const int64_t out = c.mult[level] * c.model_channels;
      b.Add(std::make_unique<ResBlock>(ch + skips.back(), out, emb));
      skips.pop_back();
      ch = out;
      if (c.attention[level]) {
        b.Add(std::make_unique<SpatialTransformer>(ch, c.depth[level], c));
      }
      if (level > 0 && r == c.res_blocks) b.Add(std::make_unique<Upsample>(ch));
      outputs_.push_back(&b);
    }
  }
  out_norm_ = &AddChild("out.0", std::make_unique<GroupNorm>(32, ch, 1e-5, true));
  out_conv_ = &AddChild("out.2", std::make_unique<Conv2d>(ch, c.out_channels, 3, 1, 1));
}

at::Tensor Unet::Forward(const at::Tensor& x, const at::Tensor& timesteps,
                         const at::Tensor& context, const at::Tensor& y) const {
  // Sinusoidal embedding of the timesteps (cos first, as ldm's timestep_embedding).
  const int64_t half = c_.model_channels / 2;
  at::Tensor freqs =
      at::exp(at::arange(half, x.options().dtype(at::kFloat)) * (-std::log(10000.0) / half));
  at::Tensor args = timesteps.to(at::kFloat).unsqueeze(1) * freqs.unsqueeze(0);
  at::Tensor t_emb = at::cat({at::cos(args), at::sin(args)}, -1).to(x.scalar_type());
  at::Tensor emb = time_out_.Forward(Silu(time_in_.Forward(t_emb)));
  if (label_in_ != nullptr) emb = emb + label_out_->Forward(Silu(label_in_->Forward(y)));
  std::vector<at::Tensor> skips;
  at::Tensor h = x;
  for (const UnetBlock* b : inputs_) {
    h = b->Forward(h, emb, context);
    skips.push_back(h);
  }
  h = middle_->Forward(h, emb, context);
  for (const UnetBlock* b : outputs_) {
    h = b->Forward(at::cat({h, skips.back()}, 1), emb, context);
    skips.pop_back();
  }
  return out_conv_->Forward(Silu(out_norm_->Forward(h)));
}

}  // namespace metaload::models
