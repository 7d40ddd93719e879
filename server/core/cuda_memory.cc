#include "server/core/cuda_memory.h"

#include <dlfcn.h>

#include <algorithm>
#include <cstddef>

namespace metaload::core {
namespace {

// The few driver API entry points used, with the driver's C types spelled out.
using CuResult = int;  // CUresult; 0 is CUDA_SUCCESS
using CuDevice = int;
using CuContext = void*;

struct Driver {
  CuResult (*init)(unsigned int) = nullptr;
  CuResult (*device_count)(int*) = nullptr;
  CuResult (*device_get)(CuDevice*, int) = nullptr;
  CuResult (*retain)(CuContext*, CuDevice) = nullptr;
  CuResult (*release)(CuDevice) = nullptr;
  CuResult (*get_current)(CuContext*) = nullptr;
  CuResult (*set_current)(CuContext) = nullptr;
  CuResult (*mem_info)(size_t*, size_t*) = nullptr;
};

template <typename F>
bool Bind(void* lib, const char* name, F* out) {
  *out = reinterpret_cast<F>(::dlsym(lib, name));
  return *out != nullptr;
}

}  // namespace

std::vector<CudaDeviceMemory> ReadCudaDeviceMemory() {
  std::vector<CudaDeviceMemory> out;
  void* lib = ::dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) return out;
  Driver d;
  const bool bound =
      Bind(lib, "cuInit", &d.init) && Bind(lib, "cuDeviceGetCount", &d.device_count) &&
      Bind(lib, "cuDeviceGet", &d.device_get) && Bind(lib, "cuDevicePrimaryCtxRetain", &d.retain) &&
      (Bind(lib, "cuDevicePrimaryCtxRelease_v2", &d.release) ||
       Bind(lib, "cuDevicePrimaryCtxRelease", &d.release)) &&
      Bind(lib, "cuCtxGetCurrent", &d.get_current) &&
      Bind(lib, "cuCtxSetCurrent", &d.set_current) && Bind(lib, "cuMemGetInfo_v2", &d.mem_info);
  int count = 0;
  if (!bound || d.init(0) != 0 || d.device_count(&count) != 0) {
    ::dlclose(lib);
    return out;
  }
  CuContext previous = nullptr;
  d.get_current(&previous);
  for (int i = 0; i < count; ++i) {
    CuDevice device = 0;
    CuContext context = nullptr;
    if (d.device_get(&device, i) != 0 || d.retain(&context, device) != 0) continue;
    size_t free_bytes = 0, total_bytes = 0;
    if (d.set_current(context) == 0 && d.mem_info(&free_bytes, &total_bytes) == 0) {
      out.push_back({i, static_cast<int64_t>(free_bytes), static_cast<int64_t>(total_bytes)});
    }
    d.set_current(previous);
    d.release(device);
  }
  // The library stays loaded: LibTorch's CUDA runtime uses the same driver.
  return out;
}

int64_t DefaultCudaBudget(const CudaDeviceMemory& device) {
  const int64_t margin = std::min<int64_t>(int64_t{1} << 30, device.total_bytes / 10);
  return std::max<int64_t>(0, device.free_bytes - margin);
}

}  // namespace metaload::core
