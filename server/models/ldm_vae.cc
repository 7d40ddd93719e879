#include "server/models/ldm_vae.h"

#include <ATen/ATen.h>

#include <memory>

#include "absl/strings/str_cat.h"

namespace metaload::models {
namespace {

using core::Conv2d;
using core::GroupNorm;

at::Tensor Silu(const at::Tensor& x) { return at::silu(x); }

// Nearest-neighbour x2, then a 3x3 convolution.
class Upsample : public core::Module {
 public:
  explicit Upsample(int64_t ch)
      : conv_(AddChild("conv", std::make_unique<Conv2d>(ch, ch, 3, 1, 1))) {}
  at::Tensor Forward(const at::Tensor& x) const {
    return conv_.Forward(
        at::upsample_nearest2d(x, std::vector<int64_t>{2 * x.size(2), 2 * x.size(3)}, 2.0, 2.0));
  }

 private:
  Conv2d& conv_;
};

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

}  // namespace

class VaeEncoder : public core::Module {
 public:
  explicit VaeEncoder(const VaeConfig& c)
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

class VaeDecoder : public core::Module {
 public:
  explicit VaeDecoder(const VaeConfig& c) {
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

Vae::Vae(const VaeConfig& c)
    : c_(c),
      encoder_(AddChild("encoder", std::make_unique<VaeEncoder>(c))),
      decoder_(AddChild("decoder", std::make_unique<VaeDecoder>(c))),
      quant_(
          AddChild("quant_conv", std::make_unique<Conv2d>(2 * c.z_channels, 2 * c.embed_dim, 1))),
      post_quant_(
          AddChild("post_quant_conv", std::make_unique<Conv2d>(c.embed_dim, c.z_channels, 1))) {}

at::Tensor Vae::Encode(const at::Tensor& image) const {
  return quant_.Forward(encoder_.Forward(image)).narrow(1, 0, c_.embed_dim);
}

at::Tensor Vae::Decode(const at::Tensor& latents) const {
  return decoder_.Forward(post_quant_.Forward(latents));
}

}  // namespace metaload::models
