#include "server/core/staging_ring.h"

namespace metaload::core {

StagingRing::StagingRing(Device* device, int slots, size_t slot_bytes)
    : device_(device), slot_bytes_(slot_bytes), held_(static_cast<size_t>(slots), false) {
  data_.reserve(static_cast<size_t>(slots));
  for (int i = 0; i < slots; ++i) data_.push_back(device_->AllocateHost(slot_bytes));
}

StagingRing::~StagingRing() {
  Drain();
  for (char* d : data_) device_->FreeHost(d);
}

StagingRing::Lease StagingRing::Acquire() {
  int slot = -1;
  {
    MutexLock lock(&mu_);
    const int n = static_cast<int>(held_.size());
    lock.Wait(freed_, [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      for (int i = 0; i < n; ++i) {
        const int candidate = (next_ + i) % n;
        if (!held_[static_cast<size_t>(candidate)]) {
          slot = candidate;
          return true;
        }
      }
      return false;
    });
    held_[static_cast<size_t>(slot)] = true;
    next_ = (slot + 1) % n;
  }
  // Outside the lock: other workers lease other slots while this one waits for the device.
  device_->WaitSlot(slot);
  return {slot, data_[static_cast<size_t>(slot)], slot_bytes_};
}

void StagingRing::Release(const Lease& lease) {
  {
    MutexLock lock(&mu_);
    held_[static_cast<size_t>(lease.slot)] = false;
  }
  freed_.notify_one();
}

void StagingRing::Drain() {
  for (int i = 0; i < slots(); ++i) device_->WaitSlot(i);
}

}  // namespace metaload::core
