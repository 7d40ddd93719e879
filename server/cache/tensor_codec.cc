#include "server/cache/tensor_codec.h"

#include <ATen/ATen.h>

#include <cstring>

#include "absl/strings/str_cat.h"
#include "server/core/dtype.h"
#include "server/core/torch_types.h"

namespace metaload::cache {

absl::StatusOr<at::Tensor> DecodeTensor(const WireTensor& wire) {
  const std::string who = absl::StrCat("input '", wire.name, "'");
  std::optional<core::DType> dtype = core::DTypeFromKServeName(wire.datatype);
  if (!dtype) {
    return absl::InvalidArgumentError(
        absl::StrCat(who, ": unknown datatype '", wire.datatype,
                     "' (FP32 FP16 BF16 FP64 INT64 INT32 INT8 UINT8 BOOL)"));
  }
  if (wire.shape.size() > 16)
    return absl::InvalidArgumentError(absl::StrCat(who, ": rank above 16"));
  int64_t numel = 1;
  for (int64_t d : wire.shape) {
    if (d < 0) return absl::InvalidArgumentError(absl::StrCat(who, ": negative dimension ", d));
    if (__builtin_mul_overflow(numel, d, &numel)) {
      return absl::InvalidArgumentError(absl::StrCat(who, ": shape product overflows"));
    }
  }
  int64_t nbytes = 0;
  if (__builtin_mul_overflow(numel, static_cast<int64_t>(core::DTypeSize(*dtype)), &nbytes) ||
      nbytes > kMaxWireTensorBytes) {
    return absl::InvalidArgumentError(absl::StrCat(who, ": tensor too large"));
  }
  const int fields =
      !wire.raw_data.empty() + !wire.fp32_contents.empty() + !wire.int64_contents.empty();
  if (fields > 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(who, ": set raw_data or one typed *_contents field, not several"));
  }
  const at::TensorOptions options = at::TensorOptions().dtype(core::ToScalarType(*dtype));
  if (!wire.fp32_contents.empty()) {
    if (*dtype != core::DType::kFloat32) {
      return absl::InvalidArgumentError(absl::StrCat(who, ": fp32_contents needs datatype FP32"));
    }
    if (static_cast<int64_t>(wire.fp32_contents.size()) != numel) {
      return absl::InvalidArgumentError(absl::StrCat(who, ": ", wire.fp32_contents.size(),
                                                     " fp32_contents for a shape of ", numel,
                                                     " elements"));
    }
    at::Tensor t = at::empty(wire.shape, options);
    std::memcpy(t.data_ptr(), wire.fp32_contents.data(), static_cast<size_t>(nbytes));
    return t;
  }
  if (!wire.int64_contents.empty()) {
    if (*dtype != core::DType::kInt64) {
      return absl::InvalidArgumentError(absl::StrCat(who, ": int64_contents needs datatype INT64"));
    }
    if (static_cast<int64_t>(wire.int64_contents.size()) != numel) {
      return absl::InvalidArgumentError(absl::StrCat(who, ": ", wire.int64_contents.size(),
                                                     " int64_contents for a shape of ", numel,
                                                     " elements"));
    }
    at::Tensor t = at::empty(wire.shape, options);
    std::memcpy(t.data_ptr(), wire.int64_contents.data(), static_cast<size_t>(nbytes));
    return t;
  }
  if (static_cast<int64_t>(wire.raw_data.size()) != nbytes) {
    return absl::InvalidArgumentError(absl::StrCat(who, ": raw_data has ", wire.raw_data.size(),
                                                   " bytes, shape x datatype needs ", nbytes));
  }
  at::Tensor t = at::empty(wire.shape, options);
  if (nbytes > 0) std::memcpy(t.data_ptr(), wire.raw_data.data(), static_cast<size_t>(nbytes));
  if (*dtype == core::DType::kBool) t = t.ne(0);  // any non-zero byte is true
  return t;
}

WireTensor EncodeTensor(const std::string& name, const at::Tensor& tensor, bool typed) {
  at::Tensor t = tensor.detach().to(at::kCPU).contiguous();
  WireTensor wire;
  wire.name = name;
  wire.shape = t.sizes().vec();
  std::optional<core::DType> dtype = core::FromScalarType(t.scalar_type());
  if (!dtype || !core::KServeName(*dtype)) {
    t = t.to(at::kFloat);
    dtype = core::DType::kFloat32;
  }
  if (typed && core::IsFloatingPoint(*dtype)) {
    at::Tensor f = t.to(at::kFloat).contiguous();
    wire.datatype = "FP32";
    wire.fp32_contents.assign(f.data_ptr<float>(), f.data_ptr<float>() + f.numel());
    return wire;
  }
  wire.datatype = std::string(*core::KServeName(*dtype));
  if (typed && *dtype == core::DType::kInt64) {
    wire.int64_contents.assign(t.data_ptr<int64_t>(), t.data_ptr<int64_t>() + t.numel());
    return wire;
  }
  wire.raw_data.assign(static_cast<const char*>(t.data_ptr()), static_cast<size_t>(t.nbytes()));
  return wire;
}

}  // namespace metaload::cache
