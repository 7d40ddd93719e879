#include "server/core/host_arena.h"

#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "server/core/process_memory.h"

namespace metaload::core {
namespace {

constexpr uint64_t kMiB = 1 << 20;

HostArena::Options Kept(uint64_t capacity, std::chrono::milliseconds idle = std::chrono::hours(1)) {
  HostArena::Options o;
  o.capacity = capacity;
  o.idle_release = idle;
  return o;
}

// A block, every page of it written (faulted), as a loaded model's is.
std::shared_ptr<HostBlock> Take(HostArena& arena, uint64_t bytes) {
  absl::StatusOr<std::shared_ptr<HostBlock>> block = arena.Take(bytes);
  EXPECT_TRUE(block.ok()) << block.status();
  if (!block.ok()) return nullptr;
  std::memset((*block)->data(), 0x11, (*block)->size());
  return *block;
}

TEST(HostArenaTest, AFreedBlockIsHandedOutAgainWithItsPages) {
  HostArena arena(Kept(64 * kMiB));
  auto a = Take(arena, 10 * kMiB + 1);
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->size(), 12 * kMiB);  // whole huge pages
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a->data()) % (2 * kMiB), 0u);
  EXPECT_EQ(a->reused_bytes(), 0u);
  std::memset(a->data(), 0x5a, a->size());
  char* data = a->data();
  a.reset();
  EXPECT_EQ(arena.stats().kept_bytes, 12 * kMiB);

  auto b = *arena.Take(12 * kMiB);  // not written: its bytes are the old block's
  EXPECT_EQ(b->data(), data);
  EXPECT_EQ(b->reused_bytes(), 12 * kMiB);
  EXPECT_EQ(b->data()[12 * kMiB - 1], 0x5a);  // the same memory, not a fresh mapping
  EXPECT_EQ(arena.stats().kept_bytes, 0u);
  EXPECT_EQ(arena.stats().reused_bytes_total, 12 * kMiB);
}

TEST(HostArenaTest, ASmallerTakeSplitsAndTheHalvesJoinAgain) {
  HostArena arena(Kept(64 * kMiB));
  Take(arena, 16 * kMiB).reset();
  auto head = Take(arena, 6 * kMiB);
  EXPECT_EQ(head->reused_bytes(), 6 * kMiB);
  EXPECT_EQ(arena.stats().kept_bytes, 10 * kMiB);
  head.reset();
  // One block of 16 again: a load of the first size reuses all of it.
  auto whole = Take(arena, 16 * kMiB);
  EXPECT_EQ(whole->reused_bytes(), 16 * kMiB);
  EXPECT_EQ(arena.stats().kept_bytes, 0u);
}

TEST(HostArenaTest, ALargerTakeGrowsAKeptBlockKeepingItsBytes) {
  HostArena arena(Kept(64 * kMiB));
  auto a = Take(arena, 8 * kMiB);
  for (uint64_t i = 0; i < a->size(); i += 4096) a->data()[i] = static_cast<char>(i / 4096);
  a.reset();
  auto b = *arena.Take(20 * kMiB);
  EXPECT_EQ(b->size(), 20 * kMiB);
  EXPECT_EQ(b->reused_bytes(), 8 * kMiB);
  for (uint64_t i = 0; i < 8 * kMiB; i += 4096) {
    ASSERT_EQ(b->data()[i], static_cast<char>(i / 4096)) << i;  // moved, not copied or zeroed
  }
  std::memset(b->data(), 1, b->size());  // all of it is writable
  EXPECT_EQ(arena.stats().kept_bytes, 0u);
}

// Reuse counts only pages that hold memory: a block a failed load took and never wrote keeps
// address space, not memory, and what is kept then takes nothing from MemAvailable.
TEST(HostArenaTest, ReuseCountsOnlyFaultedPages) {
  HostArena arena(Kept(64 * kMiB));
  absl::StatusOr<std::shared_ptr<HostBlock>> untouched = arena.Take(16 * kMiB);
  ASSERT_TRUE(untouched.ok());
  std::memset((*untouched)->data(), 1, 4 * kMiB);  // a quarter written, then the load failed
  untouched->reset();
  EXPECT_EQ(arena.stats().kept_bytes, 16 * kMiB);
  EXPECT_GE(arena.KeptResidentBytes(), 4 * kMiB);
  EXPECT_LT(arena.KeptResidentBytes(), 16 * kMiB);
  absl::StatusOr<std::shared_ptr<HostBlock>> again = arena.Take(16 * kMiB);
  ASSERT_TRUE(again.ok());
  EXPECT_GE((*again)->reused_bytes(), 4 * kMiB);
  EXPECT_LT((*again)->reused_bytes(), 16 * kMiB);
  EXPECT_EQ(arena.KeptResidentBytes(), 0u);
}

TEST(HostArenaTest, AFreshTakeGivesBackKeptMemoryFirst) {
  HostArena arena(Kept(64 * kMiB));
  auto a = Take(arena, 4 * kMiB);
  auto b = Take(arena, 4 * kMiB);
  auto c = Take(arena, 4 * kMiB);
  a.reset();
  c.reset();
  EXPECT_EQ(arena.stats().kept_bytes, 8 * kMiB);
  // 12 MiB: one kept block grows, and the fresh bytes it needs are given back from the rest,
  // so the process holds no more than before plus this block.
  auto d = Take(arena, 12 * kMiB);
  EXPECT_GE(d->reused_bytes(), 4 * kMiB);
  EXPECT_EQ(arena.stats().kept_bytes, 0u);
  EXPECT_EQ(arena.stats().reused_bytes_total + arena.stats().released_bytes_total, 8 * kMiB);
}

TEST(HostArenaTest, TheCapacityBoundsWhatIsKept) {
  HostArena arena(Kept(8 * kMiB));
  Take(arena, 16 * kMiB).reset();  // larger than the capacity: unmapped at once
  EXPECT_EQ(arena.stats().kept_bytes, 0u);
  auto a = Take(arena, 6 * kMiB);
  auto b = Take(arena, 6 * kMiB);
  a.reset();
  EXPECT_EQ(arena.stats().kept_bytes, 6 * kMiB);
  b.reset();  // the oldest makes room (a tail of it, or all of it)
  EXPECT_LE(arena.stats().kept_bytes, 8 * kMiB);
  EXPECT_GE(arena.stats().kept_bytes, 6 * kMiB);

  HostArena none(Kept(0));
  Take(none, 4 * kMiB).reset();
  EXPECT_EQ(none.stats().kept_bytes, 0u);
}

TEST(HostArenaTest, TrimToGivesMemoryBackToTheKernel) {
  HostArena arena(Kept(512 * kMiB));
  auto a = Take(arena, 256 * kMiB);
  std::memset(a->data(), 1, a->size());
  a.reset();
  absl::StatusOr<ProcessMemory> before = ReadProcessMemory();
  ASSERT_TRUE(before.ok());
  EXPECT_EQ(arena.TrimTo(100 * kMiB), 156 * kMiB);
  EXPECT_EQ(arena.stats().kept_bytes, 100 * kMiB);
  EXPECT_EQ(arena.TrimTo(0), 100 * kMiB);
  absl::StatusOr<ProcessMemory> after = ReadProcessMemory();
  ASSERT_TRUE(after.ok());
  EXPECT_LE(after->rss_bytes, before->rss_bytes - static_cast<int64_t>(200 * kMiB));
  EXPECT_EQ(arena.stats().released_bytes_total, 256 * kMiB);
}

TEST(HostArenaTest, IdleMemoryIsGivenBack) {
  HostArena arena(Kept(64 * kMiB, std::chrono::milliseconds(50)));
  Take(arena, 8 * kMiB).reset();
  EXPECT_EQ(arena.stats().kept_bytes, 8 * kMiB);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (arena.stats().kept_bytes > 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(arena.stats().kept_bytes, 0u);
  EXPECT_EQ(arena.stats().released_bytes_total, 8 * kMiB);
  // And it keeps doing so for blocks that come back later.
  Take(arena, 4 * kMiB).reset();
  while (arena.stats().kept_bytes > 0 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(arena.stats().kept_bytes, 0u);
}

TEST(HostArenaTest, ABlockMayOutliveItsArena) {
  std::shared_ptr<HostBlock> block;
  {
    HostArena arena(Kept(64 * kMiB));
    block = Take(arena, 4 * kMiB);
    Take(arena, 4 * kMiB).reset();
  }
  std::memset(block->data(), 1, block->size());
  block.reset();  // unmapped now (ASan and the leak check see it)
}

TEST(HostArenaTest, AnAbsurdSizeIsRefusedNotMapped) {
  HostArena arena(Kept(64 * kMiB));
  absl::StatusOr<std::shared_ptr<HostBlock>> block = arena.Take(uint64_t{1} << 60);
  ASSERT_FALSE(block.ok());
  EXPECT_EQ(block.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(arena.Take(~uint64_t{0}).status().code(), absl::StatusCode::kResourceExhausted);
}

// Takes and returns from four threads at once (TSan runs this): what is kept never exceeds the
// capacity, and every byte handed out is writable.
TEST(HostArenaTest, ConcurrentTakesAndReturns) {
  HostArena arena(Kept(24 * kMiB, std::chrono::milliseconds(5)));
  std::vector<std::thread> threads;
  std::atomic<bool> over{false};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      std::vector<std::shared_ptr<HostBlock>> held;
      for (int i = 0; i < 200; ++i) {
        if (held.size() > 2 || (rng() % 2 == 0 && !held.empty())) {
          held.erase(held.begin() + static_cast<long>(rng() % held.size()));
        } else {
          absl::StatusOr<std::shared_ptr<HostBlock>> b = arena.Take((rng() % 6 + 1) * kMiB);
          ASSERT_TRUE(b.ok()) << b.status();
          (*b)->data()[0] = 1;
          (*b)->data()[(*b)->size() - 1] = 1;
          held.push_back(*b);
        }
        if (arena.stats().kept_bytes > 24 * kMiB) over = true;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_FALSE(over.load());
}

}  // namespace
}  // namespace metaload::core
