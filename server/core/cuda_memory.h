// Free and total memory of each CUDA device this process can see, asked of the CUDA driver
// (libcuda.so.1, opened at run time: a CPU-only build and a machine without a GPU need nothing
// and get an empty list). Devices are numbered as CUDA numbers them (CUDA_VISIBLE_DEVICES
// applies), so index N is LibTorch's cuda:N. Reading a device retains its primary context, the
// one LibTorch uses, so the call costs no memory LibTorch would not spend anyway.
#ifndef METALOAD_SERVER_CORE_CUDA_MEMORY_H_
#define METALOAD_SERVER_CORE_CUDA_MEMORY_H_

#include <cstdint>
#include <vector>

namespace metaload::core {

struct CudaDeviceMemory {
  int index = 0;
  int64_t free_bytes = 0;
  int64_t total_bytes = 0;
};

std::vector<CudaDeviceMemory> ReadCudaDeviceMemory();

// The default budget of a CUDA device: its free memory at start, minus a margin for the CUDA
// context, library workspaces and activations (1 GiB, or a tenth of the device when smaller).
int64_t DefaultCudaBudget(const CudaDeviceMemory& device);

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_CUDA_MEMORY_H_
