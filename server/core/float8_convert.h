// Tensors converted to and from the float8 formats (float8.h). LibTorch 1.13 has no float8
// type, so a float8 tensor is a kByte tensor whose format is known to its owner (a module slot's
// tag, module.h). On a CPU the conversions are loops over float8.h's codec and table; on other
// devices they are ATen operations (the same rounding rules; the tests run both on a CPU and
// compare them for every float16 value).
#ifndef METALOAD_SERVER_CORE_FLOAT8_CONVERT_H_
#define METALOAD_SERVER_CORE_FLOAT8_CONVERT_H_

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include "server/core/dtype.h"

namespace metaload::core {

// Writes `src` (float32, float16, bfloat16 or float64) converted to `format` (kFloat8E4M3 or
// kFloat8E5M2) into `dst`: kByte, as many elements, same device.
void EncodeFloat8(const at::Tensor& src, DType format, const at::Tensor& dst);

// Writes the values of `src` (kByte holding `format`) into `dst`, a floating tensor of as many
// elements on the same device, in dst's dtype.
void DecodeFloat8(const at::Tensor& src, DType format, const at::Tensor& dst);

// `src`, holding values of `src_dtype`, written into `dst` as `dst_dtype` (dst's scalar type is
// ToScalarType(dst_dtype)): a plain copy_ unless either side is float8.
void ConvertTensor(const at::Tensor& src, DType src_dtype, const at::Tensor& dst, DType dst_dtype);

// The device-generic paths, exposed so that tests can run them on a CPU.
at::Tensor EncodeFloat8WithTensorOps(const at::Tensor& src, DType format);
at::Tensor DecodeFloat8WithTensorOps(const at::Tensor& src, DType format, at::ScalarType dtype);

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_FLOAT8_CONVERT_H_
