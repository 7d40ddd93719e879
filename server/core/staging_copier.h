// The device ends of LoadModule's StagingRing (staging_ring.h): what happens to a slot's bytes
// once a worker has read them from the checkpoint.
//   - CPU: plain slots; the copy (and any dtype conversion) runs synchronously on the worker.
//   - any other device: pinned slots; the copy is enqueued on a side stream in the stored dtype
//     and converted on the device; an event per slot says when it may be refilled.
// Device-generic (c10::Stream, c10::Event), so the device path compiles against the CPU-only
// LibTorch and runs on the CPU in tests through the same ring (LoadOptions::staged).
//
// Thread-safety: Copy from many workers at once, each with the slot it leased; Finish once,
// after the last Copy.
#ifndef METALOAD_SERVER_CORE_STAGING_COPIER_H_
#define METALOAD_SERVER_CORE_STAGING_COPIER_H_

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <cstdint>
#include <memory>

#include "server/core/dtype.h"
#include "server/core/staging_ring.h"

namespace metaload::core {

class StagedCopier : public StagingRing::Device {
 public:
  // `count` elements of `stored` from the slot into `dst` (a flat view of the destination),
  // converting to `target`. The slot may be refilled once WaitSlot(slot) returns.
  virtual void Copy(int slot, int64_t count, DType stored, DType target, const at::Tensor& dst) = 0;
  // Waits until every copy has landed.
  virtual void Finish() = 0;
};

// The copier for `device`; `slots` is the ring's slot count (one event each off the CPU).
std::unique_ptr<StagedCopier> MakeStagedCopier(c10::Device device, int slots);

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_STAGING_COPIER_H_
