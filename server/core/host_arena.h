// HostArena: host memory that loads fill, kept faulted between them.
//
// Filling fresh memory is bounded by page faults, not by the copy (server/README.md, "Measured
// facts"): a 1.4 GB checkpoint out of the page cache takes 0.2 s into memory already touched and
// 0.7-1 s into fresh memory. The daemon loads, unloads and switches checkpoints for days, so the
// memory of a model that goes is kept here, faulted, and the next load's destinations are carved
// out of it.
//
// - Take(n) hands out one block of n bytes (rounded up to 2 MiB, aligned to 2 MiB, transparent
//   huge pages advised): the smallest kept block that fits (its tail stays kept), else the
//   largest kept block grown in place with mremap (its pages move, none is copied or faulted
//   again), else a fresh mapping. Before it maps fresh bytes it gives back as many kept bytes
//   (oldest first), so a take never grows the process by more than its own size.
// - A block comes back when its last reference drops (a model's tensors hold it): it is kept,
//   newest last, while the kept bytes stay within `capacity`, else the oldest kept blocks are
//   given back to make room (a block larger than the capacity is given back at once).
// - Kept memory is given back to the kernel (munmap) after `idle_release` without use, by the
//   arena's own thread, and whenever the owner asks (TrimTo: the budget needs the room).
//
// What is kept is not in use by any model: the cache counts it as reclaimable, never against
// the budget. A block outlives the arena safely (it is then unmapped when it comes back).
// LibTorch-free; thread-safe.
#ifndef METALOAD_SERVER_CORE_HOST_ARENA_H_
#define METALOAD_SERVER_CORE_HOST_ARENA_H_

#include <chrono>
#include <cstdint>
#include <memory>
#include <thread>

#include "absl/status/statusor.h"

namespace metaload::core {

class HostArena;

class HostBlock {
 public:
  ~HostBlock();  // back to the arena (or unmapped)
  HostBlock(const HostBlock&) = delete;
  HostBlock& operator=(const HostBlock&) = delete;

  char* data() const { return data_; }
  uint64_t size() const { return size_; }
  // Bytes of this block that were backed by memory when it was handed out (kept pages reused).
  uint64_t reused_bytes() const { return reused_; }

 private:
  friend class HostArena;
  struct Shared;
  HostBlock(std::shared_ptr<Shared> shared, char* data, uint64_t size, uint64_t reused)
      : shared_(std::move(shared)), data_(data), size_(size), reused_(reused) {}

  std::shared_ptr<Shared> shared_;
  char* data_;
  uint64_t size_;
  uint64_t reused_;
};

class HostArena {
 public:
  using Clock = std::chrono::steady_clock;
  struct Options {
    // Most bytes kept for reuse; 0 keeps nothing (every block is unmapped when it comes back).
    uint64_t capacity = 0;
    // Kept memory unused this long is given back; zero: only when capacity or TrimTo asks.
    std::chrono::milliseconds idle_release{std::chrono::seconds(60)};
  };
  struct Stats {
    uint64_t kept_bytes = 0;            // held for reuse now (not in any block handed out)
    uint64_t reused_bytes_total = 0;    // kept bytes handed out again, since start
    uint64_t released_bytes_total = 0;  // kept bytes given back to the kernel, since start
  };

  explicit HostArena(Options options);
  ~HostArena();  // gives back everything kept; blocks still out are unmapped when they return
  HostArena(const HostArena&) = delete;
  HostArena& operator=(const HostArena&) = delete;

  // A block of at least `bytes` (see above). RESOURCE_EXHAUSTED when the kernel refuses.
  absl::StatusOr<std::shared_ptr<HostBlock>> Take(uint64_t bytes);

  // Gives back kept memory, oldest first, until at most `keep` bytes are kept. Returns the
  // bytes given back.
  uint64_t TrimTo(uint64_t keep);

  Stats stats() const;
  // Of the kept bytes, those backed by memory now (mincore): a block a failed load took, or
  // the fresh tail of a grown one, may hold address space the kernel never gave pages to.
  // What the kept memory takes from MemAvailable. Costs a walk of the kept page tables.
  uint64_t KeptResidentBytes() const;
  const Options& options() const { return options_; }

 private:
  void IdleLoop();

  const Options options_;
  std::shared_ptr<HostBlock::Shared> shared_;
  std::thread idle_thread_;
};

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_HOST_ARENA_H_
