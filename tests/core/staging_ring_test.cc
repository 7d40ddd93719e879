// The staging ring's ordering, with a fake device whose copies run on their own thread, finish
// late and in any order, and read the slot only when they run: a slot refilled before its copy
// ran would show up as wrong bytes at the destination (and is counted). A device that does not
// wait (the control) must be caught by the same check.
#include "server/core/staging_ring.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

namespace metaload::core {
namespace {

class FakeDevice : public StagingRing::Device {
 public:
  explicit FakeDevice(bool waits) : waits_(waits), worker_([this] { Run(); }) {}
  ~FakeDevice() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    worker_.join();
    for (char* d : retired_) delete[] d;
  }
  char* AllocateHost(size_t bytes) override {
    ++allocated_;
    return new char[bytes];
  }
  void FreeHost(char* data) override {
    ++freed_;
    retired_.push_back(data);  // freed after the last queued copy (the control device needs it)
  }
  // Waits until every queued copy ran.
  void WaitAll() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] {
      for (const auto& [slot, n] : pending_)
        if (n != 0) return false;
      return true;
    });
  }
  void WaitSlot(int slot) override {
    if (!waits_) return;
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return pending_[slot] == 0; });
  }
  // Queues a copy of `n` bytes from `src` (slot `slot`) to `dst`; `expected` is what src holds now.
  void Submit(int slot, const char* src, char* dst, size_t n) {
    std::string expected(src, n);
    std::lock_guard<std::mutex> lock(mu_);
    ++pending_[slot];
    queue_.push_back([this, slot, src, dst, n, expected] {
      if (std::memcmp(src, expected.data(), n) != 0) ++overwritten;
      std::memcpy(dst, src, n);
      std::lock_guard<std::mutex> lock(mu_);
      --pending_[slot];
      cv_.notify_all();
    });
    cv_.notify_all();
  }
  std::atomic<int> overwritten{0};
  std::atomic<int> allocated_{0}, freed_{0};

 private:
  void Run() {
    std::mt19937 rng(7);
    while (true) {
      std::function<void()> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;
        // Late and out of order: any queued copy may go next.
        const size_t pick = rng() % queue_.size();
        job = std::move(queue_[pick]);
        queue_.erase(queue_.begin() + static_cast<std::ptrdiff_t>(pick));
      }
      std::this_thread::sleep_for(std::chrono::microseconds(rng() % 300));
      job();
    }
  }

  const bool waits_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  std::map<int, int> pending_;
  bool stop_ = false;
  std::vector<char*> retired_;
  std::thread worker_;
};

// Four workers move `source` through a ring of 3 slots of 4 KiB into `dst`.
void MoveThroughRing(FakeDevice& device, const std::string& source, std::string* dst) {
  constexpr size_t kSlot = 4096;
  {
    StagingRing ring(&device, 3, kSlot);
    std::atomic<size_t> next{0};
    std::vector<std::thread> workers;
    for (int w = 0; w < 4; ++w) {
      workers.emplace_back([&] {
        for (size_t c; (c = next.fetch_add(1)) * kSlot < source.size();) {
          const size_t begin = c * kSlot;
          const size_t n = std::min(kSlot, source.size() - begin);
          StagingRing::Lease lease = ring.Acquire();
          EXPECT_EQ(lease.bytes, kSlot);
          std::memcpy(lease.data, source.data() + begin, n);  // "read from the file"
          device.Submit(lease.slot, lease.data, dst->data() + begin, n);
          ring.Release(lease);
        }
      });
    }
    for (auto& w : workers) w.join();
  }  // the ring drains before freeing its slots
}

std::string RandomBytes(size_t n) {
  std::mt19937 rng(1);
  std::string s(n, '\0');
  for (char& c : s) c = static_cast<char>(rng());
  return s;
}

TEST(StagingRingTest, NeverRefillsASlotTheDeviceStillReads) {
  const std::string source = RandomBytes(2 << 20);
  FakeDevice device(/*waits=*/true);
  std::string dst(source.size(), '\0');
  MoveThroughRing(device, source, &dst);
  EXPECT_EQ(dst, source);
  EXPECT_EQ(device.overwritten.load(), 0);
  EXPECT_EQ(device.allocated_.load(), 3);
  EXPECT_EQ(device.freed_.load(), 3);
}

TEST(StagingRingTest, ADeviceThatDoesNotWaitIsCaught) {
#if defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "the broken device races with the ring on purpose; TSan rightly reports it, "
                  "and the other tests here show TSan the ring's ordering with a correct device";
#endif
  const std::string source = RandomBytes(2 << 20);
  FakeDevice device(/*waits=*/false);
  std::string dst(source.size(), '\0');
  MoveThroughRing(device, source, &dst);
  device.WaitAll();
  EXPECT_GT(device.overwritten.load(), 0);
  EXPECT_NE(dst, source);
}

}  // namespace
}  // namespace metaload::core
