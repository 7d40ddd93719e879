// The CUDA driver query: on a machine without the driver it answers with no devices (and costs
// nothing); where there is one, every device reports free <= total. The default budget leaves a
// margin of 1 GiB, or a tenth of a small device.
#include "server/core/cuda_memory.h"

#include <dlfcn.h>
#include <gtest/gtest.h>

namespace metaload::core {
namespace {

TEST(CudaMemoryTest, DevicesAsTheDriverSeesThem) {
  std::vector<CudaDeviceMemory> devices = ReadCudaDeviceMemory();
  void* driver = ::dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (driver == nullptr) {
    EXPECT_TRUE(devices.empty());
    return;
  }
  for (size_t i = 0; i < devices.size(); ++i) {
    EXPECT_EQ(devices[i].index, static_cast<int>(i));
    EXPECT_GT(devices[i].total_bytes, 0);
    EXPECT_LE(devices[i].free_bytes, devices[i].total_bytes);
  }
}

TEST(CudaMemoryTest, DefaultBudgetKeepsAMargin) {
  const int64_t gib = int64_t{1} << 30;
  EXPECT_EQ(DefaultCudaBudget({0, 140 * gib, 141 * gib}), 139 * gib);  // an H200
  EXPECT_EQ(DefaultCudaBudget({0, 7 * gib, 8 * gib}), 7 * gib - 8 * gib / 10);
  EXPECT_EQ(DefaultCudaBudget({0, 3 * gib, 4 * gib}), 3 * gib - 4 * gib / 10);  // small card
  EXPECT_EQ(DefaultCudaBudget({0, 100 << 20, 4 * gib}), 0);  // nearly full: nothing to spare
}

}  // namespace
}  // namespace metaload::core
