#include "server/core/host_arena.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "server/core/byte_size.h"
#include "server/core/log.h"
#include "server/core/mutex.h"

namespace metaload::core {
namespace {

constexpr uint64_t kHugePage = 2 << 20;
// Far above any budget, far below overflowing the rounding.
constexpr uint64_t kMaxBlock = uint64_t{1} << 50;

struct Range {
  char* data;
  uint64_t size;
};

void Unmap(const std::vector<Range>& ranges) {
  for (const Range& r : ranges) ::munmap(r.data, r.size);
}

// The bytes of [data, data + size) that are backed by memory now (faulted), by mincore(2).
uint64_t ResidentBytes(const char* data, uint64_t size) {
  static const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  std::vector<unsigned char> pages((size + page - 1) / page);
  if (pages.empty() || ::mincore(const_cast<char*>(data), size, pages.data()) != 0) return 0;
  uint64_t resident = 0;
  for (unsigned char p : pages) resident += p & 1;
  return std::min(size, resident * page);
}

// `bytes` of address space aligned to a huge page, huge pages advised; nullptr when refused.
char* MapAligned(uint64_t bytes) {
  void* raw = ::mmap(nullptr, bytes + kHugePage, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (begin + kHugePage - 1) & ~(kHugePage - 1);
  if (aligned > begin) ::munmap(raw, aligned - begin);
  const uintptr_t end = begin + bytes + kHugePage;
  if (end > aligned + bytes)
    ::munmap(reinterpret_cast<void*>(aligned + bytes), end - aligned - bytes);
  char* data = reinterpret_cast<char*>(aligned);
  ::madvise(data, bytes, MADV_HUGEPAGE);
  return data;
}

}  // namespace

struct HostBlock::Shared {
  struct Kept {
    char* data;
    uint64_t size;
    HostArena::Clock::time_point since;  // when it came back
  };
  uint64_t capacity = 0;
  Mutex mu;
  std::condition_variable changed;
  bool closed ABSL_GUARDED_BY(mu) = false;     // the arena is gone: keep nothing
  std::vector<Kept> kept ABSL_GUARDED_BY(mu);  // oldest first
  HostArena::Stats stats ABSL_GUARDED_BY(mu);

  // Removes the oldest kept blocks until at most `keep` bytes are kept; they are the caller's
  // to unmap, after the lock.
  void TrimLocked(uint64_t keep, std::vector<Range>* out) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
    size_t i = 0;
    while (stats.kept_bytes > keep && i < kept.size()) {
      Kept& k = kept[i];
      // Only part of the oldest block must go: its tail, so its head stays where it is.
      const uint64_t over = (stats.kept_bytes - keep + kHugePage - 1) & ~(kHugePage - 1);
      const uint64_t cut = std::min(over, k.size);
      out->push_back({k.data + (k.size - cut), cut});
      k.size -= cut;
      stats.kept_bytes -= cut;
      stats.released_bytes_total += cut;
      if (k.size > 0) break;
      ++i;
    }
    kept.erase(kept.begin(), kept.begin() + static_cast<std::ptrdiff_t>(i));
  }
};

HostBlock::~HostBlock() {
  std::vector<Range> unmap;
  {
    MutexLock lock(&shared_->mu);
    if (shared_->closed || size_ > shared_->capacity) {
      unmap.push_back({data_, size_});
    } else {
      shared_->TrimLocked(shared_->capacity - size_, &unmap);
      // Adjacent kept blocks (a block and the tail it was split from) become one again, so the
      // whole can serve a larger load later.
      char* data = data_;
      uint64_t size = size_;
      auto& kept = shared_->kept;
      for (auto it = kept.begin(); it != kept.end();) {
        if (it->data == data + size) {
          size += it->size;
        } else if (it->data + it->size == data) {
          data = it->data;
          size += it->size;
        } else {
          ++it;
          continue;
        }
        shared_->stats.kept_bytes -= it->size;
        it = kept.erase(it);
      }
      kept.push_back({data, size, HostArena::Clock::now()});
      shared_->stats.kept_bytes += size;
      shared_->changed.notify_all();
    }
  }
  Unmap(unmap);
}

HostArena::HostArena(Options options)
    : options_(options), shared_(std::make_shared<HostBlock::Shared>()) {
  shared_->capacity = options.capacity;
  if (options_.capacity > 0 && options_.idle_release.count() > 0) {
    idle_thread_ = std::thread([this] { IdleLoop(); });
  }
}

HostArena::~HostArena() {
  {
    MutexLock lock(&shared_->mu);
    shared_->closed = true;
    shared_->changed.notify_all();
  }
  if (idle_thread_.joinable()) idle_thread_.join();
  TrimTo(0);
}

absl::StatusOr<std::shared_ptr<HostBlock>> HostArena::Take(uint64_t bytes) {
  if (bytes > kMaxBlock) {
    return absl::ResourceExhaustedError(
        absl::StrCat("a host block of ", bytes, " bytes is beyond any budget"));
  }
  const uint64_t n = std::max(kHugePage, (bytes + kHugePage - 1) & ~(kHugePage - 1));
  std::vector<Range> unmap;
  Range grow{nullptr, 0};
  {
    MutexLock lock(&shared_->mu);
    auto& kept = shared_->kept;
    auto fit = kept.end();
    auto largest = kept.end();
    for (auto it = kept.begin(); it != kept.end(); ++it) {
      if (it->size >= n && (fit == kept.end() || it->size < fit->size)) fit = it;
      if (it->size < n && (largest == kept.end() || it->size > largest->size)) largest = it;
    }
    if (fit != kept.end()) {
      char* data = fit->data;
      if (fit->size > n) {
        fit->data += n;
        fit->size -= n;
      } else {
        kept.erase(fit);
      }
      shared_->stats.kept_bytes -= n;
      lock.Unlock();
      // Only the pages a model faulted are reused (a block a failed load took may hold fewer).
      const uint64_t reused = ResidentBytes(data, n);
      MutexLock count(&shared_->mu);
      shared_->stats.reused_bytes_total += reused;
      return std::shared_ptr<HostBlock>(new HostBlock(shared_, data, n, reused));
    }
    if (largest != kept.end()) {
      grow = {largest->data, largest->size};
      shared_->stats.kept_bytes -= largest->size;
      kept.erase(largest);
    }
    // The fresh bytes this take maps: as many kept ones go back first.
    const uint64_t fresh = n - grow.size;
    shared_->TrimLocked(shared_->stats.kept_bytes > fresh ? shared_->stats.kept_bytes - fresh : 0,
                        &unmap);
  }
  Unmap(unmap);
  char* data = MapAligned(n);
  if (data == nullptr) {
    Unmap({grow});
    return absl::ResourceExhaustedError(absl::StrCat(
        "the kernel refused ", HumanBytes(static_cast<int64_t>(n)), " of host memory"));
  }
  uint64_t reused = 0;
  if (grow.data != nullptr) {
    // The kept pages move to the front of the new block (page tables, no copy, no fault).
    void* moved = ::mremap(grow.data, grow.size, grow.size, MREMAP_MAYMOVE | MREMAP_FIXED, data);
    if (moved == MAP_FAILED) {
      // A kept range that spans two mappings (joined by address) cannot move in one call on
      // some kernels: it is given back, and this block is all fresh.
      LogWarning("host_arena_grow_failed")
          .Kv("bytes", static_cast<int64_t>(grow.size))
          .Kv("error", std::strerror(errno));
      Unmap({grow});
    } else {
      reused = ResidentBytes(data, grow.size);
      ::madvise(data, n, MADV_HUGEPAGE);
    }
  }
  if (reused > 0) {
    MutexLock lock(&shared_->mu);
    shared_->stats.reused_bytes_total += reused;
  }
  return std::shared_ptr<HostBlock>(new HostBlock(shared_, data, n, reused));
}

uint64_t HostArena::TrimTo(uint64_t keep) {
  std::vector<Range> unmap;
  {
    MutexLock lock(&shared_->mu);
    shared_->TrimLocked(keep, &unmap);
  }
  Unmap(unmap);
  uint64_t freed = 0;
  for (const Range& r : unmap) freed += r.size;
  return freed;
}

uint64_t HostArena::KeptResidentBytes() const {
  MutexLock lock(&shared_->mu);
  uint64_t resident = 0;
  for (const auto& k : shared_->kept) resident += ResidentBytes(k.data, k.size);
  return resident;
}

HostArena::Stats HostArena::stats() const {
  MutexLock lock(&shared_->mu);
  return shared_->stats;
}

void HostArena::IdleLoop() {
  HostBlock::Shared& s = *shared_;
  for (;;) {
    std::vector<Range> unmap;
    {
      MutexLock lock(&s.mu);
      // Sleeps until the oldest kept block has been idle for the period (or forever while
      // nothing is kept); a block coming back or the arena closing wakes it.
      lock.Wait(s.changed,
                [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) { return s.closed || !s.kept.empty(); });
      if (s.closed) return;
      const Clock::time_point due = s.kept.front().since + options_.idle_release;
      if (Clock::now() < due) {
        lock.WaitUntil(s.changed, due,
                       [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) { return s.closed; });
        continue;
      }
      // Everything unused for the period goes; the kept blocks are oldest first.
      const Clock::time_point now = Clock::now();
      uint64_t idle = 0;
      for (const auto& k : s.kept) {
        if (k.since + options_.idle_release <= now) idle += k.size;
      }
      s.TrimLocked(s.stats.kept_bytes - idle, &unmap);
    }
    Unmap(unmap);
  }
}

}  // namespace metaload::core
