// The head reshapes of multi-head attention, shared by the Stable Diffusion networks (the
// UNet's cross-attention, the CLIP text encoder). Pure functions on views: thread-safe.
#ifndef METALOAD_SERVER_MODELS_ATTENTION_HEADS_H_
#define METALOAD_SERVER_MODELS_ATTENTION_HEADS_H_

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace metaload::models {

// [B, T, H*hd] -> [B, H, T, hd]
inline at::Tensor SplitHeads(const at::Tensor& x, int64_t heads) {
  return x.view({x.size(0), x.size(1), heads, x.size(2) / heads}).transpose(1, 2);
}

// [B, H, T, hd] -> [B, T, H*hd]
inline at::Tensor MergeHeads(const at::Tensor& x) {
  return x.transpose(1, 2).reshape({x.size(0), x.size(2), x.size(1) * x.size(3)});
}

}  // namespace metaload::models

#endif  // METALOAD_SERVER_MODELS_ATTENTION_HEADS_H_
