// A tensor as it travels in metaload.v1.Tensor, without protobuf or LibTorch types, so the gRPC
// layer and the torch layer meet on plain data (and never in one translation unit).
#ifndef METALOAD_SERVER_CACHE_WIRE_TENSOR_H_
#define METALOAD_SERVER_CACHE_WIRE_TENSOR_H_

#include <cstdint>
#include <string>
#include <vector>

namespace metaload::cache {

struct WireTensor {
  std::string name;
  std::string datatype;  // KServe: FP32 FP16 BF16 FP64 INT64 INT32 INT8 UINT8 BOOL
  std::vector<int64_t> shape;
  std::string raw_data;  // little-endian, row-major
  std::vector<float> fp32_contents;
  std::vector<int64_t> int64_contents;
};

}  // namespace metaload::cache

#endif  // METALOAD_SERVER_CACHE_WIRE_TENSOR_H_
