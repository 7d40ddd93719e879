// The layer kit: the building blocks of metaload's architectures, allocating every parameter
// and buffer through the init context (see module.h for why these are not torch::nn modules).
// Weights use PyTorch's layouts and names ("weight", "bias"), so checkpoint keys map onto them
// directly. Every layer computes in its module's compute dtype (module.h): floating inputs
// are expected in it, weights are cast to it when stored in another. Forward passes read the
// weights from their slots and are const: concurrent forwards on one loaded model are safe.
#ifndef METALOAD_SERVER_CORE_LAYERS_H_
#define METALOAD_SERVER_CORE_LAYERS_H_

#include <functional>

#include "server/core/module.h"

namespace metaload::core {

// y = x W^T + b, W [out, in] (torch.nn.Linear).
class Linear : public Module {
 public:
  Linear(int64_t in_features, int64_t out_features, bool bias = true);
  at::Tensor Forward(const at::Tensor& x) const;

 private:
  at::Tensor& weight_;
  at::Tensor* bias_ = nullptr;
};

// torch.nn.Conv2d with square kernels; W [out, in, k, k].
class Conv2d : public Module {
 public:
  Conv2d(int64_t in_channels, int64_t out_channels, int64_t kernel, int64_t stride = 1,
         int64_t padding = 0, bool bias = true);
  at::Tensor Forward(const at::Tensor& x) const;

 private:
  at::Tensor& weight_;
  at::Tensor* bias_ = nullptr;
  int64_t stride_, padding_;
};

// Row lookup, W [num, dim] (torch.nn.Embedding).
class Embedding : public Module {
 public:
  Embedding(int64_t num_embeddings, int64_t dim);
  at::Tensor Forward(const at::Tensor& ids) const;
  // The table in the compute dtype (for an output projection tied to it).
  at::Tensor weight() const { return Weight(weight_); }

 private:
  at::Tensor& weight_;
};

// torch.nn.LayerNorm over the last dimension.
class LayerNorm : public Module {
 public:
  explicit LayerNorm(int64_t dim, double eps = 1e-5, bool affine = true);
  at::Tensor Forward(const at::Tensor& x) const;

 private:
  int64_t dim_;
  double eps_;
  at::Tensor* weight_ = nullptr;
  at::Tensor* bias_ = nullptr;
};

// torch.nn.GroupNorm over [N, C, ...]. With `float32`, statistics and affine run in float32
// and the result is cast back to x's dtype (ldm's GroupNorm32, used by Stable Diffusion's UNet).
class GroupNorm : public Module {
 public:
  GroupNorm(int64_t groups, int64_t channels, double eps = 1e-5, bool float32 = false);
  at::Tensor Forward(const at::Tensor& x) const;

 private:
  int64_t groups_;
  double eps_;
  bool float32_;
  at::Tensor& weight_;
  at::Tensor& bias_;
};

// x * rsqrt(mean(x^2) + eps) * weight, computed in float32 (Llama's RMSNorm).
class RMSNorm : public Module {
 public:
  explicit RMSNorm(int64_t dim, double eps = 1e-6);
  at::Tensor Forward(const at::Tensor& x) const;

 private:
  double eps_;
  at::Tensor& weight_;
};

// Multi-head self-attention with separate q/k/v/o projections (children "q_proj", "k_proj",
// "v_proj", "o_proj") and grouped-query attention when kv_heads < heads.
class Attention : public Module {
 public:
  struct Options {
    int64_t dim = 0;
    int64_t heads = 1;
    int64_t kv_heads = 0;  // 0: same as heads
    bool qkv_bias = true;
    bool out_bias = true;
  };
  // Applied to q [B, H, T, hd] and k [B, KV, T, hd] before the scores (rotary embeddings).
  using PositionFn = std::function<void(at::Tensor& q, at::Tensor& k)>;

  explicit Attention(const Options& options);
  // x [B, T, dim]; `key_mask` [B, T] (1 attend, 0 padding) may be undefined.
  at::Tensor Forward(const at::Tensor& x, bool causal, const at::Tensor& key_mask = at::Tensor(),
                     const PositionFn& position = nullptr) const;

 private:
  Options options_;
  Linear& q_proj_;
  Linear& k_proj_;
  Linear& v_proj_;
  Linear& o_proj_;
};

// softmax((q k^T) / sqrt(hd) + masks) v for q [B, H, Tq, hd], k/v [B, H, Tk, hd]; scores in
// float32 whatever the inputs' dtype. Shared by the architectures' own attention layouts.
at::Tensor ScaledDotProductAttention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     bool causal, const at::Tensor& key_mask);

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_LAYERS_H_
