// Reads and writes NumPy .npy files (format version 1.0/2.0, little-endian, C order) as
// metaload.v1.Tensor raw data, so `metaload infer` can take inputs from and save outputs to
// files that numpy.load / numpy.save understand.
#ifndef METALOAD_CLIENT_NPY_H_
#define METALOAD_CLIENT_NPY_H_

#include <string>

#include "absl/status/statusor.h"
#include "metaload/v1/metaload.pb.h"

namespace metaload::client {

// Fills datatype, shape and raw_data of `tensor` from the .npy file at `path`.
absl::Status ReadNpy(const std::string& path, metaload::v1::Tensor* tensor);

// Writes `tensor` (raw_data, fp32_contents or int64_contents) as a .npy file.
absl::Status WriteNpy(const metaload::v1::Tensor& tensor, const std::string& path);

}  // namespace metaload::client

#endif  // METALOAD_CLIENT_NPY_H_
