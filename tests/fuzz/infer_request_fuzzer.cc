// libFuzzer target: serialized metaload.v1.InferRequest messages, decoded the way the service
// does (FromProto, then CheckWireTensor before anything is allocated).
#include <google/protobuf/stubs/logging.h>

#include <cstddef>
#include <cstdint>

#include "metaload/v1/metaload.pb.h"
#include "server/cache/wire_tensor.h"
#include "server/service/request_codec.h"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  google::protobuf::SetLogHandler(nullptr);  // invalid UTF-8 in a string field is logged
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  metaload::v1::InferRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return 0;
  using metaload::cache::WireLayout;
  for (metaload::v1::Tensor& t : *request.mutable_inputs()) {
    metaload::cache::WireTensor wire = metaload::service::FromProto(&t);
    absl::StatusOr<WireLayout> layout = metaload::cache::CheckWireTensor(wire);
    if (!layout.ok()) {
      if (!absl::IsInvalidArgument(layout.status())) __builtin_trap();
      continue;
    }
    // An accepted tensor's values are exactly what its shape and datatype need.
    if (layout->numel < 0 || layout->nbytes < 0 ||
        layout->nbytes > metaload::cache::kMaxWireTensorBytes) {
      __builtin_trap();
    }
    switch (layout->field) {
      case WireLayout::Field::kRaw:
        if (static_cast<int64_t>(wire.raw_data.size()) != layout->nbytes) __builtin_trap();
        break;
      case WireLayout::Field::kFp32:
        if (static_cast<int64_t>(wire.fp32_contents.size()) != layout->numel) __builtin_trap();
        break;
      case WireLayout::Field::kInt64:
        if (static_cast<int64_t>(wire.int64_contents.size()) != layout->numel) __builtin_trap();
        break;
      case WireLayout::Field::kNone:
        if (layout->nbytes != 0) __builtin_trap();
        break;
    }
    metaload::v1::Tensor back;
    metaload::service::ToProto(&wire, &back);
    if (back.shape_size() != static_cast<int>(wire.shape.size())) __builtin_trap();
  }
  return 0;
}
