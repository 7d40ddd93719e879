// A ring of staging buffers between a checkpoint file and a device. A worker leases a slot,
// fills it from the file, hands it to the device to copy from asynchronously, and returns it;
// the next lease of that slot first waits until the device has finished reading it. With CUDA
// the slots are pinned host memory and the copies run on a side stream, each followed by an
// event; the ring never lets a read overwrite bytes a copy has not consumed yet.
//
// The ordering lives here, with no LibTorch or CUDA in sight, so it is tested on CPU with a fake
// device whose copies finish late and out of order (tests/core/staging_ring_test.cc); the CUDA
// device is in staging_copier.cc. Thread-safe: any number of workers may lease at once (a worker
// with no free slot waits).
#ifndef METALOAD_SERVER_CORE_STAGING_RING_H_
#define METALOAD_SERVER_CORE_STAGING_RING_H_

#include <condition_variable>
#include <cstddef>
#include <mutex>
#include <vector>

#include "server/core/mutex.h"

namespace metaload::core {

class StagingRing {
 public:
  // What the ring needs from a device.
  class Device {
   public:
    virtual ~Device() = default;
    // Host memory for one slot (pinned, for CUDA); freed by FreeHost.
    virtual char* AllocateHost(size_t bytes) = 0;
    virtual void FreeHost(char* data) = 0;
    // Blocks until the device has finished reading slot `slot` (what was last submitted from
    // it); returns at once when nothing was submitted from it.
    virtual void WaitSlot(int slot) = 0;
  };

  struct Lease {
    int slot = -1;
    char* data = nullptr;
    size_t bytes = 0;
  };

  StagingRing(Device* device, int slots, size_t slot_bytes);
  ~StagingRing();  // waits for every slot (Drain), then frees them
  StagingRing(const StagingRing&) = delete;
  StagingRing& operator=(const StagingRing&) = delete;

  // The next slot nobody holds, in turn, once the device is done with it.
  Lease Acquire();
  // Gives the slot back after its copy was submitted (or abandoned).
  void Release(const Lease& lease);
  // Waits until the device has finished with every slot.
  void Drain();

  int slots() const { return static_cast<int>(data_.size()); }
  size_t slot_bytes() const { return slot_bytes_; }

 private:
  Device* device_;
  const size_t slot_bytes_;
  std::vector<char*> data_;
  Mutex mu_;
  std::condition_variable freed_;
  std::vector<bool> held_ ABSL_GUARDED_BY(mu_);
  int next_ ABSL_GUARDED_BY(mu_) = 0;  // where the round-robin search starts
};

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_STAGING_RING_H_
