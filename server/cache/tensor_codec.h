// WireTensor <-> at::Tensor. Decoding checks everything a remote caller controls before
// allocating: a known datatype, non-negative dimensions whose product (and byte size) fits,
// exactly one of raw_data or a typed field matching the datatype, and a byte or element count
// equal to what the shape needs. Failures are INVALID_ARGUMENT naming the tensor.
#ifndef METALOAD_SERVER_CACHE_TENSOR_CODEC_H_
#define METALOAD_SERVER_CACHE_TENSOR_CODEC_H_

#include <ATen/core/Tensor.h>

#include "absl/status/statusor.h"
#include "server/cache/wire_tensor.h"

namespace metaload::cache {

// Largest tensor accepted in a request (also bounded by the gRPC message size).
inline constexpr int64_t kMaxWireTensorBytes = int64_t{1} << 32;

absl::StatusOr<at::Tensor> DecodeTensor(const WireTensor& wire);

// `typed`: fill fp32_contents (floating outputs, converted to FP32) or int64_contents instead of
// raw_data where a typed field exists for the type.
WireTensor EncodeTensor(const std::string& name, const at::Tensor& tensor, bool typed);

}  // namespace metaload::cache

#endif  // METALOAD_SERVER_CACHE_TENSOR_CODEC_H_
