#include "server/cache/tensor_codec.h"

#include <ATen/ATen.h>

#include <cstring>

#include "absl/strings/str_cat.h"
#include "server/core/dtype.h"
#include "server/core/torch_types.h"

namespace metaload::cache {

absl::StatusOr<at::Tensor> DecodeTensor(const WireTensor& wire) {
  absl::StatusOr<WireLayout> layout = CheckWireTensor(wire);
  if (!layout.ok()) return layout.status();
  const void* values = nullptr;
  switch (layout->field) {
    case WireLayout::Field::kRaw:
      values = wire.raw_data.data();
      break;
    case WireLayout::Field::kFp32:
      values = wire.fp32_contents.data();
      break;
    case WireLayout::Field::kInt64:
      values = wire.int64_contents.data();
      break;
    case WireLayout::Field::kNone:
      break;
  }
  at::Tensor t =
      at::empty(wire.shape, at::TensorOptions().dtype(core::ToScalarType(layout->dtype)));
  if (values != nullptr) std::memcpy(t.data_ptr(), values, static_cast<size_t>(layout->nbytes));
  if (layout->dtype == core::DType::kBool) t = t.ne(0);  // any non-zero byte is true
  return t;
}

absl::StatusOr<WireTensor> EncodeTensor(const std::string& name, const at::Tensor& tensor,
                                        bool typed) {
  // A model (TorchScript above all) may return anything: only dense tensors with storage have
  // bytes to send.
  if (!tensor.defined()) {
    return absl::FailedPreconditionError(
        absl::StrCat("output '", name, "' is an undefined tensor"));
  }
  if (tensor.layout() != at::kStrided) {
    return absl::FailedPreconditionError(
        absl::StrCat("output '", name, "' is a ", c10::toString(tensor.layout()),
                     " tensor; only dense (strided) outputs can be sent"));
  }
  if (tensor.is_meta() || tensor.is_quantized() || tensor.is_complex()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "output '", name, "' is a meta, quantized or complex tensor, which has no wire form"));
  }
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
