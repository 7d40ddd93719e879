// A device as a request names it: "cpu" (or ""), "cuda" (the first CUDA device), "cuda:N".
// The one place that knows the syntax: the service validates requests with it (LibTorch-free),
// core::ParseDevice (torch_types.h) turns it into a c10::Device and checks the device exists.
#ifndef METALOAD_SERVER_CORE_DEVICE_NAME_H_
#define METALOAD_SERVER_CORE_DEVICE_NAME_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace metaload::core {

struct DeviceName {
  bool cuda = false;
  int index = 0;  // CUDA device index, 0..255
};

// INVALID_ARGUMENT ("device 'x': expected cpu, cuda or cuda:N") for anything else.
absl::StatusOr<DeviceName> ParseDeviceName(absl::string_view text);

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_DEVICE_NAME_H_
