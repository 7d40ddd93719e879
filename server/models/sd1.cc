// sd1: Stable Diffusion 1.x single-file checkpoints (.safetensors or .ckpt) in the original LDM
// layout, the web UI's payload:
//
//   model.diffusion_model.                    UNet (ldm's UNetModel)
//   first_stage_model.                        AutoencoderKL
//   cond_stage_model.transformer.text_model.  CLIP ViT-L/14 text encoder ("text_model." may be
//                                             missing, as in older checkpoints; mapped here)
//   alphas_cumprod, betas, ...                the DDPM schedule, kept as buffers when present
//
// Sizes come from the checkpoint's keys and shapes (so small test configs load too); what the
// shapes cannot tell is SD1's: 8 attention heads in the UNet, 64-wide heads in CLIP. The
// variants the web UI knows by their UNet input channels load the same way: 9 inpainting, 8
// instruct-pix2pix. Keys outside the networks (model_ema.*, optimizer state) are reported as
// unexpected, not errors.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "server/core/init_context.h"
#include "server/core/layers.h"
#include "server/models/module_model.h"

namespace metaload::models {
namespace {

using core::Conv2d;
using core::GroupNorm;
using core::LayerNorm;
using core::Linear;

constexpr char kUnet[] = "model.diffusion_model.";
constexpr char kVae[] = "first_stage_model.";
constexpr char kClip[] = "cond_stage_model.transformer.text_model.";
constexpr char kClipShort[] = "cond_stage_model.transformer.";

// What LatentDiffusion registers for its noise schedule.
const char* const kScheduleBuffers[] = {"betas",
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

struct UnetConfig {
  int64_t in_channels = 4, out_channels = 4, model_channels = 320, res_blocks = 2;
  int64_t heads = 8, context_dim = 768, depth = 1;
  std::vector<int64_t> mult;    // per level
  std::vector<bool> attention;  // per level
};

struct VaeConfig {
  int64_t in_channels = 3, out_channels = 3, ch = 128, res_blocks = 2, z_channels = 4;
  int64_t embed_dim = 4;
  std::vector<int64_t> mult;
};

struct ClipConfig {
  int64_t vocab = 49408, positions = 77, width = 768, layers = 12, heads = 12, ffn = 3072;
};

at::Tensor Silu(const at::Tensor& x) { return at::silu(x); }

// [B, T, H*hd] -> [B, H, T, hd]
at::Tensor SplitHeads(const at::Tensor& x, int64_t heads) {
  return x.view({x.size(0), x.size(1), heads, x.size(2) / heads}).transpose(1, 2);
}
at::Tensor MergeHeads(const at::Tensor& x) {
  return x.transpose(1, 2).reshape({x.size(0), x.size(2), x.size(1) * x.size(3)});
}

// ---- UNet ------------------------------------------------------------------------------------

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

class SpatialTransformer : public UnetLayer {
 public:
  SpatialTransformer(int64_t channels, const UnetConfig& c)
      : norm_(AddChild("norm", std::make_unique<GroupNorm>(32, channels, 1e-6))),
        proj_in_(AddChild("proj_in", std::make_unique<Conv2d>(channels, channels, 1))),
        proj_out_(AddChild("proj_out", std::make_unique<Conv2d>(channels, channels, 1))) {
    for (int64_t d = 0; d < c.depth; ++d) {
      blocks_.push_back(
          &AddChild(absl::StrCat("transformer_blocks.", d),
                    std::make_unique<TransformerBlock>(channels, c.context_dim, c.heads)));
    }
  }
  at::Tensor Forward(const at::Tensor& x, const at::Tensor&,
                     const at::Tensor& context) const override {
    const int64_t b = x.size(0), ch = x.size(1), h = x.size(2), w = x.size(3);
    at::Tensor y = proj_in_.Forward(norm_.Forward(x)).permute({0, 2, 3, 1}).reshape({b, h * w, ch});
    for (const TransformerBlock* block : blocks_) y = block->Forward(y, context);
    return x + proj_out_.Forward(y.reshape({b, h, w, ch}).permute({0, 3, 1, 2}));
  }

 private:
  GroupNorm& norm_;
  Conv2d& proj_in_;
  Conv2d& proj_out_;
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

// Nearest-neighbour x2, then a 3x3 convolution (UNet and VAE alike).
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

class Unet : public core::Module {
 public:
  explicit Unet(const UnetConfig& c)
      : c_(c),
        time_in_(AddChild("time_embed.0",
                          std::make_unique<Linear>(c.model_channels, 4 * c.model_channels))),
        time_out_(AddChild("time_embed.2",
                           std::make_unique<Linear>(4 * c.model_channels, 4 * c.model_channels))) {
    const int64_t emb = 4 * c.model_channels;
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
        if (c.attention[level]) b.Add(std::make_unique<SpatialTransformer>(ch, c));
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
                   .Add(std::make_unique<SpatialTransformer>(ch, c))
                   .Add(std::make_unique<ResBlock>(ch, ch, emb));
    for (size_t level = levels; level-- > 0;) {
      for (int64_t r = 0; r <= c.res_blocks; ++r) {
        UnetBlock& b = block(absl::StrCat("output_blocks.", outputs_.size()));
        const int64_t out = c.mult[level] * c.model_channels;
        b.Add(std::make_unique<ResBlock>(ch + skips.back(), out, emb));
        skips.pop_back();
        ch = out;
        if (c.attention[level]) b.Add(std::make_unique<SpatialTransformer>(ch, c));
        if (level > 0 && r == c.res_blocks) b.Add(std::make_unique<Upsample>(ch));
        outputs_.push_back(&b);
      }
    }
    out_norm_ = &AddChild("out.0", std::make_unique<GroupNorm>(32, ch, 1e-5, true));
    out_conv_ = &AddChild("out.2", std::make_unique<Conv2d>(ch, c.out_channels, 3, 1, 1));
  }

  at::Tensor Forward(const at::Tensor& x, const at::Tensor& timesteps,
                     const at::Tensor& context) const {
    // Sinusoidal embedding of the timesteps (cos first, as ldm's timestep_embedding).
    const int64_t half = c_.model_channels / 2;
    at::Tensor freqs =
        at::exp(at::arange(half, x.options().dtype(at::kFloat)) * (-std::log(10000.0) / half));
    at::Tensor args = timesteps.to(at::kFloat).unsqueeze(1) * freqs.unsqueeze(0);
    at::Tensor t_emb = at::cat({at::cos(args), at::sin(args)}, -1).to(x.scalar_type());
    at::Tensor emb = time_out_.Forward(Silu(time_in_.Forward(t_emb)));
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

 private:
  UnetConfig c_;
  Linear& time_in_;
  Linear& time_out_;
  std::vector<const UnetBlock*> inputs_;
  const UnetBlock* middle_ = nullptr;
  std::vector<const UnetBlock*> outputs_;
  GroupNorm* out_norm_ = nullptr;
  Conv2d* out_conv_ = nullptr;
};

// ---- VAE (AutoencoderKL) ---------------------------------------------------------------------

class VaeResBlock : public core::Module {
 public:
  VaeResBlock(int64_t in, int64_t out)
      : norm1_(AddChild("norm1", std::make_unique<GroupNorm>(32, in, 1e-6))),
        conv1_(AddChild("conv1", std::make_unique<Conv2d>(in, out, 3, 1, 1))),
        norm2_(AddChild("norm2", std::make_unique<GroupNorm>(32, out, 1e-6))),
        conv2_(AddChild("conv2", std::make_unique<Conv2d>(out, out, 3, 1, 1))) {
    if (in != out) shortcut_ = &AddChild("nin_shortcut", std::make_unique<Conv2d>(in, out, 1));
  }
  at::Tensor Forward(const at::Tensor& x) const {
    at::Tensor h = conv1_.Forward(Silu(norm1_.Forward(x)));
    h = conv2_.Forward(Silu(norm2_.Forward(h)));
    return (shortcut_ != nullptr ? shortcut_->Forward(x) : x) + h;
  }

 private:
  GroupNorm& norm1_;
  Conv2d& conv1_;
  GroupNorm& norm2_;
  Conv2d& conv2_;
  Conv2d* shortcut_ = nullptr;
};

// Single-head self-attention over the pixels, with 1x1 convolutions as projections.
class VaeAttention : public core::Module {
 public:
  explicit VaeAttention(int64_t ch)
      : norm_(AddChild("norm", std::make_unique<GroupNorm>(32, ch, 1e-6))),
        q_(AddChild("q", std::make_unique<Conv2d>(ch, ch, 1))),
        k_(AddChild("k", std::make_unique<Conv2d>(ch, ch, 1))),
        v_(AddChild("v", std::make_unique<Conv2d>(ch, ch, 1))),
        proj_(AddChild("proj_out", std::make_unique<Conv2d>(ch, ch, 1))) {}
  at::Tensor Forward(const at::Tensor& x) const {
    const int64_t b = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
    at::Tensor n = norm_.Forward(x);
    // [B, C, H, W] -> [B, 1, HW, C]
    auto tokens = [&](const at::Tensor& t) { return t.reshape({b, 1, c, h * w}).transpose(2, 3); };
    at::Tensor a = core::ScaledDotProductAttention(tokens(q_.Forward(n)), tokens(k_.Forward(n)),
                                                   tokens(v_.Forward(n)), false, at::Tensor());
    return x + proj_.Forward(a.transpose(2, 3).reshape({b, c, h, w}));
  }

 private:
  GroupNorm& norm_;
  Conv2d& q_;
  Conv2d& k_;
  Conv2d& v_;
  Conv2d& proj_;
};

// mid.block_1, mid.attn_1, mid.block_2
class VaeMiddle : public core::Module {
 public:
  explicit VaeMiddle(int64_t ch)
      : block1_(AddChild("block_1", std::make_unique<VaeResBlock>(ch, ch))),
        attn_(AddChild("attn_1", std::make_unique<VaeAttention>(ch))),
        block2_(AddChild("block_2", std::make_unique<VaeResBlock>(ch, ch))) {}
  at::Tensor Forward(const at::Tensor& x) const {
    return block2_.Forward(attn_.Forward(block1_.Forward(x)));
  }

 private:
  VaeResBlock& block1_;
  VaeAttention& attn_;
  VaeResBlock& block2_;
};

class Encoder : public core::Module {
 public:
  explicit Encoder(const VaeConfig& c)
      : conv_in_(AddChild("conv_in", std::make_unique<Conv2d>(c.in_channels, c.ch, 3, 1, 1))) {
    int64_t ch = c.ch;
    for (size_t level = 0; level < c.mult.size(); ++level) {
      Level l;
      for (int64_t r = 0; r < c.res_blocks; ++r) {
        const int64_t out = c.ch * c.mult[level];
        l.blocks.push_back(&AddChild(absl::StrCat("down.", level, ".block.", r),
                                     std::make_unique<VaeResBlock>(ch, out)));
        ch = out;
      }
      if (level + 1 < c.mult.size()) {
        l.down = &AddChild(absl::StrCat("down.", level, ".downsample.conv"),
                           std::make_unique<Conv2d>(ch, ch, 3, 2, 0));
      }
      levels_.push_back(l);
    }
    mid_ = &AddChild("mid", std::make_unique<VaeMiddle>(ch));
    norm_out_ = &AddChild("norm_out", std::make_unique<GroupNorm>(32, ch, 1e-6));
    conv_out_ = &AddChild("conv_out", std::make_unique<Conv2d>(ch, 2 * c.z_channels, 3, 1, 1));
  }
  at::Tensor Forward(const at::Tensor& x) const {
    at::Tensor h = conv_in_.Forward(x);
    for (const Level& l : levels_) {
      for (const VaeResBlock* b : l.blocks) h = b->Forward(h);
      // Asymmetric padding (right and bottom only), then a stride-2 convolution.
      if (l.down != nullptr) h = l.down->Forward(at::constant_pad_nd(h, {0, 1, 0, 1}, 0));
    }
    return conv_out_->Forward(Silu(norm_out_->Forward(mid_->Forward(h))));
  }

 private:
  struct Level {
    std::vector<const VaeResBlock*> blocks;
    const Conv2d* down = nullptr;
  };
  Conv2d& conv_in_;
  std::vector<Level> levels_;
  VaeMiddle* mid_ = nullptr;
  GroupNorm* norm_out_ = nullptr;
  Conv2d* conv_out_ = nullptr;
};

class Decoder : public core::Module {
 public:
  explicit Decoder(const VaeConfig& c) {
    int64_t ch = c.ch * c.mult.back();
    conv_in_ = &AddChild("conv_in", std::make_unique<Conv2d>(c.z_channels, ch, 3, 1, 1));
    mid_ = &AddChild("mid", std::make_unique<VaeMiddle>(ch));
    // up.N counts from the highest resolution, but runs from the lowest.
    for (size_t level = c.mult.size(); level-- > 0;) {
      Level l;
      for (int64_t r = 0; r <= c.res_blocks; ++r) {
        const int64_t out = c.ch * c.mult[level];
        l.blocks.push_back(&AddChild(absl::StrCat("up.", level, ".block.", r),
                                     std::make_unique<VaeResBlock>(ch, out)));
        ch = out;
      }
      if (level > 0) {
        l.up = &AddChild(absl::StrCat("up.", level, ".upsample"), std::make_unique<Upsample>(ch));
      }
      levels_.push_back(l);
    }
    norm_out_ = &AddChild("norm_out", std::make_unique<GroupNorm>(32, ch, 1e-6));
    conv_out_ = &AddChild("conv_out", std::make_unique<Conv2d>(ch, c.out_channels, 3, 1, 1));
  }
  at::Tensor Forward(const at::Tensor& z) const {
    at::Tensor h = mid_->Forward(conv_in_->Forward(z));
    for (const Level& l : levels_) {
      for (const VaeResBlock* b : l.blocks) h = b->Forward(h);
      if (l.up != nullptr) h = l.up->Forward(h);
    }
    return conv_out_->Forward(Silu(norm_out_->Forward(h)));
  }

 private:
  struct Level {
    std::vector<const VaeResBlock*> blocks;
    const Upsample* up = nullptr;
  };
  Conv2d* conv_in_ = nullptr;
  VaeMiddle* mid_ = nullptr;
  std::vector<Level> levels_;
  GroupNorm* norm_out_ = nullptr;
  Conv2d* conv_out_ = nullptr;
};

class Vae : public core::Module {
 public:
  explicit Vae(const VaeConfig& c)
      : c_(c),
        encoder_(AddChild("encoder", std::make_unique<Encoder>(c))),
        decoder_(AddChild("decoder", std::make_unique<Decoder>(c))),
        quant_(
            AddChild("quant_conv", std::make_unique<Conv2d>(2 * c.z_channels, 2 * c.embed_dim, 1))),
        post_quant_(
            AddChild("post_quant_conv", std::make_unique<Conv2d>(c.embed_dim, c.z_channels, 1))) {}
  // The mean of the posterior, unscaled (the UNet works on it times 0.18215).
  at::Tensor Encode(const at::Tensor& image) const {
    return quant_.Forward(encoder_.Forward(image)).narrow(1, 0, c_.embed_dim);
  }
  at::Tensor Decode(const at::Tensor& latents) const {
    return decoder_.Forward(post_quant_.Forward(latents));
  }

 private:
  VaeConfig c_;
  Encoder& encoder_;
  Decoder& decoder_;
  Conv2d& quant_;
  Conv2d& post_quant_;
};

// ---- CLIP text encoder -----------------------------------------------------------------------

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

class ClipText : public core::Module {
 public:
  ClipText(const ClipConfig& c, const std::vector<int64_t>& position_ids_shape)
      : tokens_(AddChild("embeddings.token_embedding",
                         std::make_unique<core::Embedding>(c.vocab, c.width))),
        positions_(AddChild("embeddings.position_embedding",
                            std::make_unique<core::Embedding>(c.positions, c.width))) {
    // Kept when present (merged checkpoints may hold broken ones); positions are 0..T-1 here.
    if (!position_ids_shape.empty()) {
      AddBuffer("embeddings.position_ids", position_ids_shape, nullptr, at::kLong);
    }
    for (int64_t i = 0; i < c.layers; ++i) {
      layers_.push_back(
          &AddChild(absl::StrCat("encoder.layers.", i), std::make_unique<ClipLayer>(c)));
    }
    final_norm_ = &AddChild("final_layer_norm", std::make_unique<LayerNorm>(c.width));
  }
  at::Tensor Forward(const at::Tensor& ids) const {
    at::Tensor positions = at::arange(ids.size(1), ids.options());
    at::Tensor x = tokens_.Forward(ids) + positions_.Forward(positions).unsqueeze(0);
    for (const ClipLayer* l : layers_) x = l->Forward(x);
    return final_norm_->Forward(x);
  }

 private:
  core::Embedding& tokens_;
  core::Embedding& positions_;
  std::vector<const ClipLayer*> layers_;
  LayerNorm* final_norm_ = nullptr;
};

// ---- the checkpoint ------------------------------------------------------------------------

class Sd1Module : public core::Module {
 public:
  Sd1Module(const UnetConfig& u, const VaeConfig& v, const ClipConfig& c,
            const std::vector<std::pair<std::string, int64_t>>& schedule,
            const std::vector<int64_t>& position_ids)
      : unet(AddChild("model.diffusion_model", std::make_unique<Unet>(u))),
        vae(AddChild("first_stage_model", std::make_unique<Vae>(v))),
        clip(AddChild("cond_stage_model.transformer.text_model",
                      std::make_unique<ClipText>(c, position_ids))) {
    for (const auto& [name, steps] : schedule) AddBuffer(name, {steps}, nullptr);
  }
  Unet& unet;
  Vae& vae;
  ClipText& clip;
};

class Sd1 : public ModuleModel {
 public:
  Sd1(std::string name, const UnetConfig& u, const VaeConfig& v, const ClipConfig& c,
      const std::vector<std::pair<std::string, int64_t>>& schedule,
      const std::vector<int64_t>& position_ids, bool short_clip_keys)
      : name_(std::move(name)), unet_(u), vae_(v), clip_(c) {
    core::InitializeOnMeta meta;
    auto module = std::make_unique<Sd1Module>(u, v, c, schedule, position_ids);
    net_ = module.get();
    SetModule(std::move(module));
    if (short_clip_keys) {
      SetKeyMap([](const std::string& name) {
        return absl::StartsWith(name, kClip)
                   ? absl::StrCat(kClipShort, name.substr(sizeof(kClip) - 1))
                   : name;
      });
    }
  }

  std::string architecture() const override { return name_; }

  std::vector<EntrySpec> Entries() const override {
    const int64_t lat = vae_.embed_dim;
    return {{"unet",
             {{"x", std::nullopt, {-1, unet_.in_channels, -1, -1}},
              {"timesteps", core::DType::kInt64, {-1}},
              {"context", std::nullopt, {-1, -1, unet_.context_dim}}},
             {{"eps", std::nullopt, {-1, unet_.out_channels, -1, -1}}}},
            {"text_encoder",
             {{"input_ids", core::DType::kInt64, {-1, -1}}},
             {{"last_hidden_state", std::nullopt, {-1, -1, clip_.width}}}},
            {"vae_decode",
             {{"latents", std::nullopt, {-1, lat, -1, -1}}},
             {{"image", std::nullopt, {-1, vae_.out_channels, -1, -1}}}},
            {"vae_encode",
             {{"image", std::nullopt, {-1, vae_.in_channels, -1, -1}}},
             {{"latent_mean", std::nullopt, {-1, lat, -1, -1}}}}};
  }

  // The web UI's: networks in float16, the VAE and alphas_cumprod as stored.
  DtypeChoice DefaultDtypes() const override {
    return {"float16", {{kVae, "keep"}, {"alphas_cumprod", "keep"}}};
  }

 protected:
  std::string EntryPrefix(const std::string& entry) const override {
    if (entry == "unet") return kUnet;
    if (entry == "text_encoder") return "cond_stage_model.";
    return kVae;
  }

  absl::StatusOr<NamedTensors> Forward(
      const std::string& entry, const std::map<std::string, at::Tensor>& inputs) const override {
    if (entry == "unet") {
      const at::Tensor& x = inputs.at("x");
      const at::Tensor& t = inputs.at("timesteps");
      const at::Tensor& context = inputs.at("context");
      if (t.size(0) != x.size(0) || context.size(0) != x.size(0)) {
        return absl::InvalidArgumentError(absl::StrCat("unet: batch sizes differ (x ", x.size(0),
                                                       ", timesteps ", t.size(0), ", context ",
                                                       context.size(0), ")"));
      }
      if (x.size(2) % Downscale() != 0 || x.size(3) % Downscale() != 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("unet: x height and width must be multiples of ", Downscale(), ", got ",
                         x.size(2), "x", x.size(3)));
      }
      return NamedTensors{{"eps", net_->unet.Forward(x, t, context)}};
    }
    if (entry == "text_encoder") {
      const at::Tensor& ids = inputs.at("input_ids");
      if (ids.size(1) > clip_.positions) {
        return absl::InvalidArgumentError(absl::StrCat("text_encoder: input_ids has ", ids.size(1),
                                                       " tokens, more than ", clip_.positions));
      }
      if (ids.numel() > 0 &&
          (ids.min().item<int64_t>() < 0 || ids.max().item<int64_t>() >= clip_.vocab)) {
        return absl::InvalidArgumentError(
            absl::StrCat("text_encoder: input_ids must be in [0, ", clip_.vocab, ")"));
      }
      return NamedTensors{{"last_hidden_state", net_->clip.Forward(ids)}};
    }
    if (entry == "vae_decode")
      return NamedTensors{{"image", net_->vae.Decode(inputs.at("latents"))}};
    return NamedTensors{{"latent_mean", net_->vae.Encode(inputs.at("image"))}};
  }

 private:
  // Height and width the UNet needs divisible: one halving per level below the first.
  int64_t Downscale() const { return int64_t{1} << (unet_.mult.size() - 1); }

  std::string name_;
  UnetConfig unet_;
  VaeConfig vae_;
  ClipConfig clip_;
  Sd1Module* net_;
};

// ---- sizes from keys and shapes --------------------------------------------------------------

bool HasPrefix(const core::CheckpointIndex& index, const std::string& prefix) {
  auto it = index.by_name.lower_bound(prefix);
  return it != index.by_name.end() && absl::StartsWith(it->first, prefix);
}

// The shape of `key`, FAILED_PRECONDITION naming it when missing or of another rank.
absl::StatusOr<std::vector<int64_t>> Shape(const core::CheckpointIndex& index,
                                           const std::string& key, size_t rank) {
  const core::TensorInfo* t = index.Find(key);
  if (t == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(index.path, ": sd1 checkpoint lacks ", key));
  }
  if (t->shape.size() != rank) {
    return absl::FailedPreconditionError(
        absl::StrCat(index.path, ": ", key, " has rank ", t->shape.size(), ", expected ", rank));
  }
  return t->shape;
}

#define ML_ASSIGN_SHAPE(var, expr)              \
  auto var##_or = (expr);                       \
  if (!var##_or.ok()) return var##_or.status(); \
  const std::vector<int64_t>& var = *var##_or

absl::Status NotSd1(const core::CheckpointIndex& index, const std::string& what) {
  return absl::FailedPreconditionError(absl::StrCat(index.path, ": not an SD1 layout: ", what));
}

absl::StatusOr<UnetConfig> ReadUnet(const core::CheckpointIndex& index) {
  const std::string p = kUnet;
  UnetConfig c;
  ML_ASSIGN_SHAPE(conv_in, Shape(index, p + "input_blocks.0.0.weight", 4));
  ML_ASSIGN_SHAPE(conv_out, Shape(index, p + "out.2.weight", 4));
  c.model_channels = conv_in[0];
  c.in_channels = conv_in[1];
  c.out_channels = conv_out[0];
  if (c.model_channels % 32 != 0) return NotSd1(index, "UNet channels not a multiple of 32");
  // Walk input_blocks: res blocks (with attention or not), then a downsampler per level.
  int64_t in_level = 0;
  for (int64_t i = 1; HasPrefix(index, absl::StrCat(p, "input_blocks.", i, ".")); ++i) {
    const std::string b = absl::StrCat(p, "input_blocks.", i, ".");
    if (index.Find(b + "0.op.weight") != nullptr) {
      if (c.res_blocks != 0 && in_level != c.res_blocks) {
        return NotSd1(index, "UNet levels with different numbers of res blocks");
      }
      c.res_blocks = in_level;
      in_level = 0;
      continue;
    }
    ML_ASSIGN_SHAPE(out, Shape(index, b + "0.out_layers.3.weight", 4));
    const bool attention = index.Find(b + "1.proj_in.weight") != nullptr;
    if (in_level == 0) {
      if (out[0] % c.model_channels != 0) return NotSd1(index, "UNet width not a multiple");
      c.mult.push_back(out[0] / c.model_channels);
      c.attention.push_back(attention);
    } else if (attention != c.attention.back()) {
      return NotSd1(index, "UNet attention differs within a level");
    }
    ++in_level;
  }
  if (c.mult.empty()) return NotSd1(index, "no UNet input blocks");
  if (c.res_blocks == 0) c.res_blocks = in_level;
  if (in_level != c.res_blocks) return NotSd1(index, "UNet levels with different res blocks");
  while (HasPrefix(index, absl::StrCat(p, "middle_block.1.transformer_blocks.", c.depth, "."))) {
    ++c.depth;
  }
  ML_ASSIGN_SHAPE(to_k,
                  Shape(index, p + "middle_block.1.transformer_blocks.0.attn2.to_k.weight", 2));
  c.context_dim = to_k[1];
  return c;
}

absl::StatusOr<VaeConfig> ReadVae(const core::CheckpointIndex& index) {
  const std::string p = kVae;
  VaeConfig c;
  ML_ASSIGN_SHAPE(conv_in, Shape(index, p + "encoder.conv_in.weight", 4));
  ML_ASSIGN_SHAPE(dec_in, Shape(index, p + "decoder.conv_in.weight", 4));
  ML_ASSIGN_SHAPE(dec_out, Shape(index, p + "decoder.conv_out.weight", 4));
  ML_ASSIGN_SHAPE(post_quant, Shape(index, p + "post_quant_conv.weight", 4));
  c.ch = conv_in[0];
  c.in_channels = conv_in[1];
  c.z_channels = dec_in[1];
  c.out_channels = dec_out[0];
  c.embed_dim = post_quant[1];
  for (size_t level = 0;
       index.Find(absl::StrCat(p, "encoder.down.", level, ".block.0.conv1.weight")) != nullptr;
       ++level) {
    ML_ASSIGN_SHAPE(
        out, Shape(index, absl::StrCat(p, "encoder.down.", level, ".block.0.conv2.weight"), 4));
    if (out[0] % c.ch != 0) return NotSd1(index, "VAE width not a multiple of its base");
    c.mult.push_back(out[0] / c.ch);
  }
  if (c.mult.empty()) return NotSd1(index, "no VAE encoder levels");
  c.res_blocks = 0;
  while (HasPrefix(index, absl::StrCat(p, "encoder.down.0.block.", c.res_blocks, "."))) {
    ++c.res_blocks;
  }
  return c;
}

absl::StatusOr<ClipConfig> ReadClip(const core::CheckpointIndex& index, const std::string& p) {
  ClipConfig c;
  ML_ASSIGN_SHAPE(tokens, Shape(index, p + "embeddings.token_embedding.weight", 2));
  ML_ASSIGN_SHAPE(positions, Shape(index, p + "embeddings.position_embedding.weight", 2));
  ML_ASSIGN_SHAPE(fc1, Shape(index, p + "encoder.layers.0.mlp.fc1.weight", 2));
  c.vocab = tokens[0];
  c.width = tokens[1];
  c.positions = positions[0];
  c.ffn = fc1[0];
  c.heads = std::max<int64_t>(1, c.width / 64);  // ViT-L/14: 768 wide, 12 heads of 64
  if (c.width % c.heads != 0) return NotSd1(index, "CLIP width not a multiple of 64");
  c.layers = 0;
  while (HasPrefix(index, absl::StrCat(p, "encoder.layers.", c.layers, "."))) ++c.layers;
  return c;
}

#undef ML_ASSIGN_SHAPE

}  // namespace

absl::StatusOr<std::unique_ptr<Model>> BuildSd1(const core::CheckpointIndex& index) {
  absl::StatusOr<UnetConfig> unet = ReadUnet(index);
  if (!unet.ok()) return unet.status();
  absl::StatusOr<VaeConfig> vae = ReadVae(index);
  if (!vae.ok()) return vae.status();
  const bool short_clip_keys = !HasPrefix(index, kClip);
  absl::StatusOr<ClipConfig> clip = ReadClip(index, short_clip_keys ? kClipShort : kClip);
  if (!clip.ok()) return clip.status();
  if (clip->width != unet->context_dim) {
    return NotSd1(
        index, absl::StrCat("CLIP width ", clip->width, " but UNet context ", unet->context_dim));
  }
  std::vector<std::pair<std::string, int64_t>> schedule;
  for (const char* name : kScheduleBuffers) {
    const core::TensorInfo* t = index.Find(name);
    if (t != nullptr && t->shape.size() == 1) schedule.emplace_back(name, t->shape[0]);
  }
  const core::TensorInfo* ids =
      index.Find(absl::StrCat(short_clip_keys ? kClipShort : kClip, "embeddings.position_ids"));
  const std::vector<int64_t> position_ids = ids != nullptr ? ids->shape : std::vector<int64_t>();
  std::string name = "sd1";
  if (unet->in_channels == 9) name = "sd1-inpainting";
  if (unet->in_channels == 8) name = "sd1-instruct-pix2pix";
  return std::unique_ptr<Model>(
      new Sd1(name, *unet, *vae, *clip, schedule, position_ids, short_clip_keys));
}

}  // namespace metaload::models
