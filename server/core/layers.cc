#include "server/core/layers.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <memory>

namespace metaload::core {
namespace {

// PyTorch's default for Linear/Conv: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
Module::InitFn Uniform(int64_t fan_in) {
  const double bound = fan_in > 0 ? 1.0 / std::sqrt(static_cast<double>(fan_in)) : 0.0;
  return [bound](at::Tensor& t) { t.uniform_(-bound, bound); };
}
Module::InitFn Fill(double value) {
  return [value](at::Tensor& t) { t.fill_(value); };
}
Module::InitFn Normal() {
  return [](at::Tensor& t) { t.normal_(); };
}

}  // namespace

Linear::Linear(int64_t in_features, int64_t out_features, bool bias)
    : weight_(AddWeight("weight", {out_features, in_features}, Uniform(in_features),
                        TensorUse::kMatmulWeight)) {
  if (bias) bias_ = &AddWeight("bias", {out_features}, Uniform(in_features), TensorUse::kWeight);
}

at::Tensor Linear::Forward(const at::Tensor& x) const {
  return at::linear(x, Weight(weight_), bias_ != nullptr ? Weight(*bias_) : at::Tensor());
}

Conv2d::Conv2d(int64_t in_channels, int64_t out_channels, int64_t kernel, int64_t stride,
               int64_t padding, bool bias)
    : weight_(AddWeight("weight", {out_channels, in_channels, kernel, kernel},
                        Uniform(in_channels * kernel * kernel), TensorUse::kMatmulWeight)),
      stride_(stride),
      padding_(padding) {
  if (bias) {
    bias_ = &AddWeight("bias", {out_channels}, Uniform(in_channels * kernel * kernel),
                       TensorUse::kWeight);
  }
}

at::Tensor Conv2d::Forward(const at::Tensor& x) const {
  return at::conv2d(x, Weight(weight_), bias_ != nullptr ? Weight(*bias_) : at::Tensor(),
                    {stride_, stride_}, {padding_, padding_});
}

Embedding::Embedding(int64_t num_embeddings, int64_t dim)
    : weight_(AddWeight("weight", {num_embeddings, dim}, Normal(), TensorUse::kWeight)) {}

// The rows are gathered as stored, then cast (or decoded): a lookup never converts the table.
at::Tensor Embedding::Forward(const at::Tensor& ids) const {
  return InComputeDtype(at::embedding(weight_, ids), weight_);
}

LayerNorm::LayerNorm(int64_t dim, double eps, bool affine) : dim_(dim), eps_(eps) {
  if (affine) {
    weight_ = &AddWeight("weight", {dim}, Fill(1), TensorUse::kWeight);
    bias_ = &AddWeight("bias", {dim}, Fill(0), TensorUse::kWeight);
  }
}

at::Tensor LayerNorm::Forward(const at::Tensor& x) const {
  return at::layer_norm(x, {dim_}, weight_ != nullptr ? Weight(*weight_) : at::Tensor(),
                        bias_ != nullptr ? Weight(*bias_) : at::Tensor(), eps_);
}

GroupNorm::GroupNorm(int64_t groups, int64_t channels, double eps, bool float32)
    : groups_(groups),
      eps_(eps),
      float32_(float32),
      weight_(AddWeight("weight", {channels}, Fill(1), TensorUse::kWeight)),
      bias_(AddWeight("bias", {channels}, Fill(0), TensorUse::kWeight)) {}

at::Tensor GroupNorm::Forward(const at::Tensor& x) const {
  if (float32_ && x.scalar_type() != at::kFloat) {
    return at::group_norm(x.to(at::kFloat), groups_, Weight(weight_).to(at::kFloat),
                          Weight(bias_).to(at::kFloat), eps_)
        .to(x.scalar_type());
  }
  return at::group_norm(x, groups_, Weight(weight_), Weight(bias_), eps_);
}

RMSNorm::RMSNorm(int64_t dim, double eps)
    : eps_(eps), weight_(AddWeight("weight", {dim}, Fill(1), TensorUse::kWeight)) {}

at::Tensor RMSNorm::Forward(const at::Tensor& x) const {
  at::Tensor x32 = x.to(at::kFloat);
  at::Tensor normed = x32 * at::rsqrt(x32.pow(2).mean({-1}, /*keepdim=*/true) + eps_);
  return Weight(weight_) * normed.to(x.scalar_type());
}

Attention::Attention(const Options& options)
    : options_(options),
      q_proj_(
          AddChild("q_proj", std::make_unique<Linear>(options.dim, options.dim, options.qkv_bias))),
      k_proj_(AddChild("k_proj", std::make_unique<Linear>(
                                     options.dim,
                                     options.dim / options.heads *
                                         (options.kv_heads > 0 ? options.kv_heads : options.heads),
                                     options.qkv_bias))),
      v_proj_(AddChild("v_proj", std::make_unique<Linear>(
                                     options.dim,
                                     options.dim / options.heads *
                                         (options.kv_heads > 0 ? options.kv_heads : options.heads),
                                     options.qkv_bias))),
      o_proj_(AddChild("o_proj",
                       std::make_unique<Linear>(options.dim, options.dim, options.out_bias))) {
  if (options_.kv_heads <= 0) options_.kv_heads = options_.heads;
}

at::Tensor Attention::Forward(const at::Tensor& x, bool causal, const at::Tensor& key_mask,
                              const PositionFn& position) const {
  const int64_t batch = x.size(0), steps = x.size(1);
  const int64_t head_dim = options_.dim / options_.heads;
  at::Tensor q = q_proj_.Forward(x).view({batch, steps, options_.heads, head_dim}).transpose(1, 2);
  at::Tensor k =
      k_proj_.Forward(x).view({batch, steps, options_.kv_heads, head_dim}).transpose(1, 2);
  at::Tensor v =
      v_proj_.Forward(x).view({batch, steps, options_.kv_heads, head_dim}).transpose(1, 2);
  if (position) position(q, k);
  if (options_.kv_heads != options_.heads) {
    const int64_t repeat = options_.heads / options_.kv_heads;
    k = k.repeat_interleave(repeat, /*dim=*/1);
    v = v.repeat_interleave(repeat, /*dim=*/1);
  }
  at::Tensor out = ScaledDotProductAttention(q, k, v, causal, key_mask);
  return o_proj_.Forward(out.transpose(1, 2).reshape({batch, steps, options_.dim}));
}

at::Tensor ScaledDotProductAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     bool causal, const at::Tensor& key_mask) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(q.size(-1)));
  at::Tensor scores = at::matmul(q.to(at::kFloat), k.to(at::kFloat).transpose(-2, -1)) * scale;
  // The lowest finite value, not -inf: a fully masked row (left padding) then averages instead
  // of producing NaN, as Hugging Face models do.
  const double neg = std::numeric_limits<float>::lowest();
  if (causal) {
    const int64_t tq = q.size(-2), tk = k.size(-2);
    at::Tensor mask = at::ones({tq, tk}, at::TensorOptions().dtype(at::kBool).device(q.device()))
                          .triu(tk - tq + 1);
    scores = scores.masked_fill(mask, neg);
  }
  if (key_mask.defined()) {
    at::Tensor pad = key_mask.to(at::kBool).logical_not().view({key_mask.size(0), 1, 1, -1});
    scores = scores.masked_fill(pad, neg);
  }
  at::Tensor probs = at::softmax(scores, -1);
  return at::matmul(probs, v.to(at::kFloat)).to(v.scalar_type());
}

}  // namespace metaload::core
