#include "server/core/staging_copier.h"

#include <ATen/ATen.h>
#include <c10/core/Event.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <chrono>
#include <thread>
#include <vector>

#include "server/core/float8_convert.h"
#include "server/core/torch_types.h"

namespace metaload::core {
namespace {

// CPU: plain slots, synchronous copies (the conversion runs here).
class HostCopier : public StagedCopier {
 public:
  char* AllocateHost(size_t bytes) override {
    slots_.push_back(at::empty({static_cast<int64_t>(bytes)}, at::kByte));
    return static_cast<char*>(slots_.back().data_ptr());
  }
  void FreeHost(char*) override {}  // the tensors go with this object
  void WaitSlot(int) override {}
  void Copy(int slot, int64_t count, DType stored, DType target, const at::Tensor& dst) override {
    ConvertTensor(Slot(slot, count, stored), stored, dst, target);
  }
  void Finish() override {}

 protected:
  at::Tensor Slot(int slot, int64_t count, DType stored) const {
    const int64_t bytes = count * DTypeSize(stored);
    return slots_[static_cast<size_t>(slot)].narrow(0, 0, bytes).view(ToScalarType(stored));
  }
  std::vector<at::Tensor> slots_;
};

// A GPU: pinned slots, copies enqueued on a side stream in the stored dtype and converted on the
// device, an event recorded after each slot's copy. Device-generic (c10::Stream, c10::Event), so
// it compiles against the CPU-only LibTorch.
class DeviceCopier : public HostCopier {
 public:
  DeviceCopier(c10::Device device, int slots)
      : impl_(device.type()), stream_(impl_.getStreamFromGlobalPool(device)) {
    for (int i = 0; i < slots; ++i) events_.emplace_back(device.type());
    // Destinations may reuse blocks the default stream freed while its work is still queued:
    // the side stream starts after everything queued there so far.
    c10::Event ready(device.type());
    ready.record(impl_.getStream(device));
    ready.block(stream_);
  }
  ~DeviceCopier() override {
    try {
      Finish();  // LoadModule already waited; this covers an exception on the way out
    } catch (const std::exception&) {
    }
  }
  char* AllocateHost(size_t bytes) override {
    slots_.push_back(at::empty({static_cast<int64_t>(bytes)},
                               at::TensorOptions().dtype(at::kByte).pinned_memory(true)));
    return static_cast<char*>(slots_.back().data_ptr());
  }
  void WaitSlot(int slot) override {
    while (!events_[static_cast<size_t>(slot)].query()) {
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }
  void Copy(int slot, int64_t count, DType stored, DType target, const at::Tensor& dst) override {
    c10::StreamGuard guard(stream_);
    at::Tensor src = Slot(slot, count, stored);
    if (stored == target) {
      dst.copy_(src, /*non_blocking=*/true);
    } else {
      // The stored bytes cross the bus; the conversion runs on the device. The scratch block
      // returns to the allocator for this stream, so its reuse stays in stream order.
      at::Tensor scratch = at::empty({count}, dst.options().dtype(ToScalarType(stored)));
      scratch.copy_(src, /*non_blocking=*/true);
      ConvertTensor(scratch, stored, dst, target);
    }
    events_[static_cast<size_t>(slot)].record(stream_);
  }
  void Finish() override { impl_.synchronizeStream(stream_); }

 private:
  c10::impl::VirtualGuardImpl impl_;
  c10::Stream stream_;
  std::vector<c10::Event> events_;
};

}  // namespace

std::unique_ptr<StagedCopier> MakeStagedCopier(c10::Device device, int slots) {
  if (device.is_cpu()) return std::make_unique<HostCopier>();
  return std::make_unique<DeviceCopier>(device, slots);
}

}  // namespace metaload::core
