// Weights cast to a network's compute dtype at forward time (module.h's Weight()), into memory
// that is reused from one forward to the next. float8 weights are decoded the same way.
//
// Why a pool: a cast into fresh memory pays the page faults of that memory. On a CPU, a
// 4096x4096 float16 weight converts to float32 in about 5 ms, but its fresh 64 MiB destination
// costs about 40 ms of faults: glibc maps such allocations anew and unmaps them on free (from
// 4 MiB in the daemon, which sets M_MMAP_THRESHOLD so that unloads return memory, see
// server/main.cc; from 32 MiB at most anywhere). So casts of at least kMinPooledBytes on the
// CPU take a buffer that an earlier cast released, when one of a fitting size is idle.
//
// A buffer returns to the pool only when the last tensor that views it is destroyed (the
// tensor's storage deleter gives it back), so a cast can never be overwritten while anything
// still reads it, whichever thread drops it. At most kMaxIdleBytes of idle buffers are kept;
// beyond that a released buffer is freed. Casts on other devices use the device's allocator
// (CUDA's caching allocator already reuses memory). Thread-safe.
#ifndef METALOAD_SERVER_CORE_WEIGHT_CAST_H_
#define METALOAD_SERVER_CORE_WEIGHT_CAST_H_

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>

#include "server/core/dtype.h"

namespace metaload::core {

struct WeightCastPoolStats {
  int64_t idle_bytes = 0;       // held by idle buffers now
  int64_t reused_total = 0;     // casts that took an idle buffer
  int64_t allocated_total = 0;  // pooled-size casts that had to allocate
};

// Smaller casts use the ordinary allocator: below the mmap threshold, malloc reuses its heap.
inline constexpr int64_t kMinPooledBytes = int64_t{4} << 20;
inline constexpr int64_t kMaxIdleBytes = int64_t{256} << 20;

// `stored` (contiguous or not) converted to `dtype`, contiguous, on its device.
at::Tensor CastWeight(const at::Tensor& stored, at::ScalarType dtype);
// `stored`, bytes holding float8 values of `format` (float8.h), decoded to `dtype` likewise.
at::Tensor DecodeWeight(const at::Tensor& stored, DType format, at::ScalarType dtype);

WeightCastPoolStats GetWeightCastPoolStats();

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_WEIGHT_CAST_H_
