// WireTensor <-> at::Tensor. Decoding allocates only after CheckWireTensor (wire_tensor.h) has
// accepted everything a remote caller controls.
#ifndef METALOAD_SERVER_CACHE_TENSOR_CODEC_H_
#define METALOAD_SERVER_CACHE_TENSOR_CODEC_H_

#include <ATen/core/Tensor.h>

#include "absl/status/statusor.h"
#include "server/cache/wire_tensor.h"

namespace metaload::cache {

absl::StatusOr<at::Tensor> DecodeTensor(const WireTensor& wire);

// `typed`: fill fp32_contents (floating outputs, converted to FP32) or int64_contents instead of
// raw_data where a typed field exists for the type. FAILED_PRECONDITION naming the output for a
// tensor with no wire form (undefined, sparse or another non-strided layout, meta, quantized,
// complex). LibTorch may still throw (out of memory): callers run it inside CatchExceptions.
absl::StatusOr<WireTensor> EncodeTensor(const std::string& name, const at::Tensor& tensor,
                                        bool typed);

}  // namespace metaload::cache

#endif  // METALOAD_SERVER_CACHE_TENSOR_CODEC_H_
