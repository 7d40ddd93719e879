#include "server/core/loader.h"

#include <ATen/ATen.h>
#include <c10/core/Event.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <sys/mman.h>

#include <chrono>
#include <mutex>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/core/dtype_policy.h"
#include "server/core/exception_boundary.h"
#include "server/core/float8_convert.h"
#include "server/core/staging_ring.h"
#include "server/core/torch_types.h"

namespace metaload::core {
namespace {

using Clock = std::chrono::steady_clock;

constexpr size_t kMissingKeysShown = 20;
constexpr uint64_t kProgressBytes = 64 << 20;
constexpr auto kProgressInterval = std::chrono::milliseconds(100);

// One module tensor and where its data comes from.
struct Planned {
  TensorSlot slot;
  const TensorInfo* info = nullptr;  // nullptr: missing, zero-filled
  DType target = DType::kFloat32;    // float8: held as kByte, the slot tagged at commit
  at::Tensor tensor;  // the new tensor; swapped into the slot only when the whole load succeeded
  bool needs_copy = false;
};

// A byte range of one planned tensor's stored bytes.
struct Chunk {
  size_t planned;
  uint64_t begin;
  uint64_t end;
};

// Fresh destinations are untouched memory; faulting them in 4 KiB pages dominated CPU loads
// (ARCHITECTURE.md). Asking for transparent huge pages before the first touch cuts the faults
// ~500-fold where the kernel allows it (THP "madvise" mode, the Debian default).
void AdviseHugePages(const at::Tensor& t) {
  constexpr uintptr_t kHuge = 2 << 20;
  if (!t.is_cpu() || t.nbytes() < 2 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(t.data_ptr()) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(t.data_ptr()) + t.nbytes()) & ~(kHuge - 1);
  if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
}

std::string ShapeString(at::IntArrayRef shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// Serialises progress callbacks and rate-limits them.
class ProgressReporter {
 public:
  ProgressReporter(const std::function<void(const LoadProgress&)>& fn, uint64_t total)
      : fn_(fn), total_(total), last_time_(Clock::now()) {}

  void Add(uint64_t bytes) {
    const uint64_t done = done_.fetch_add(bytes) + bytes;
    if (!fn_) return;
    std::unique_lock<std::mutex> lock(mu_, std::try_to_lock);
    if (!lock.owns_lock()) return;  // someone is reporting right now; the next chunk will
    const auto now = Clock::now();
    if (done - last_bytes_ < kProgressBytes && now - last_time_ < kProgressInterval) return;
    last_bytes_ = done;
    last_time_ = now;
    fn_({"read", done, total_});
  }
  void Done() {
    if (!fn_) return;
    std::lock_guard<std::mutex> lock(mu_);
    fn_({"done", done_.load(), total_});
  }

 private:
  const std::function<void(const LoadProgress&)>& fn_;
  const uint64_t total_;
  std::atomic<uint64_t> done_{0};
  std::mutex mu_;
  uint64_t last_bytes_ = 0;      // guarded by mu_
  Clock::time_point last_time_;  // guarded by mu_
};

// The device end of a StagingRing: copies a leased slot's bytes into a destination.
class StagedCopier : public StagingRing::Device {
 public:
  // `count` elements of `stored` from the slot into `dst` (a flat view of the destination),
  // converting to `target`. The slot may be refilled once WaitSlot(slot) returns.
  virtual void Copy(int slot, int64_t count, DType stored, DType target, const at::Tensor& dst) = 0;
  // Waits until every copy has landed.
  virtual void Finish() = 0;
};

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

absl::Status CheckLoadOptions(const LoadOptions& options) {
  if (options.zero_copy && !options.device.is_cpu()) {
    return absl::InvalidArgumentError("zero_copy is only possible on cpu");
  }
  return absl::OkStatus();
}

absl::StatusOr<LoadReport> LoadModule(Module& module, const CheckpointSource& source,
                                      const LoadOptions& options) {
  const auto start = Clock::now();
  const c10::Device& device = options.device;
  const DtypePolicy& policy = options.policy;
  if (absl::Status checked = CheckLoadOptions(options); !checked.ok()) return checked;
  const CheckpointIndex& index = source.index();
  if (index.format == CheckpointFormat::kTorchScript) {
    return absl::FailedPreconditionError(absl::StrCat(
        index.path, ": a TorchScript archive; load it with the torchscript architecture"));
  }

  // Plan: match module tensors with checkpoint keys, check shapes, choose dtypes.
  LoadReport report;
  // What this load allocates itself, by where: its peak, counted rather than sampled from the
  // process (whose high-water mark other loads share, and used to reset).
  uint64_t host_bytes = 0, device_bytes = 0;
  auto count = [&](const at::Tensor& t) {
    (t.is_cpu() ? host_bytes : device_bytes) += static_cast<uint64_t>(t.nbytes());
  };
  std::vector<Planned> plan;
  std::set<std::string> used;
  std::vector<std::string> missing;
  for (const TensorSlot& slot : module.Slots()) {
    Planned p;
    p.slot = slot;
    const std::string key = options.checkpoint_key ? options.checkpoint_key(slot.name) : slot.name;
    p.info = index.Find(key);
    if (p.info == nullptr) {
      missing.push_back(key);
      p.target = FromScalarType(slot.tensor->scalar_type()).value_or(DType::kFloat32);
      plan.push_back(std::move(p));
      continue;
    }
    used.insert(key);
    if (!slot.tensor->sizes().equals(p.info->shape)) {
      return absl::FailedPreconditionError(absl::StrCat(
          index.path, ": key '", key, "': checkpoint has shape ", ShapeString(p.info->shape),
          ", the model expects ", ShapeString(slot.tensor->sizes())));
    }
    // A floating tensor in the file for a slot the model reads as integers (position ids,
    // say) would load and fail at the first forward: refuse it here, naming the key.
    if (IsFloatingPoint(p.info->dtype) && !at::isFloatingType(slot.tensor->scalar_type())) {
      return absl::FailedPreconditionError(
          absl::StrCat(index.path, ": key '", key, "' is ", DTypeName(p.info->dtype),
                       "; the model reads it as ", c10::toString(slot.tensor->scalar_type())));
    }
    p.target = policy.Resolve(key, p.info->dtype, slot.use);
    plan.push_back(std::move(p));
  }
  if (!missing.empty() && !options.allow_missing_keys) {
    std::vector<std::string> shown(missing.begin(),
                                   missing.begin() + std::min(missing.size(), kMissingKeysShown));
    return absl::FailedPreconditionError(absl::StrCat(
        index.path, ": ", missing.size(),
        " key(s) the model needs are missing from the checkpoint: ", absl::StrJoin(shown, ", "),
        missing.size() > kMissingKeysShown ? ", ..." : "",
        " (allow_missing_keys zero-fills them)"));
  }
  report.missing_keys = missing;
  for (const TensorInfo& t : index.tensors) {
    if (!used.count(t.name)) report.unexpected_keys.push_back(t.name);
  }

  // Allocate destinations (no page is touched yet) or view the mapping.
  std::shared_ptr<const MappedFile> mapped;
  std::vector<Chunk> chunks;
  uint64_t total = 0;
  for (size_t i = 0; i < plan.size(); ++i) {
    Planned& p = plan[i];
    // Allocation is where a load meets the machine's limits (a CUDA OOM, a CPU allocation the
    // kernel refuses): RESOURCE_EXHAUSTED naming the key, never an exception.
    absl::Status allocated = CatchExceptions(
        absl::StrCat(index.path, ": key '", p.info != nullptr ? p.info->name : p.slot.name, "'"),
        [&]() -> absl::Status {
          const at::TensorOptions to =
              at::TensorOptions().dtype(ToScalarType(p.target)).device(device);
          if (p.info == nullptr) {
            p.tensor = at::zeros(p.slot.tensor->sizes(), to);
            count(p.tensor);
            return absl::OkStatus();
          }
          const DType stored = p.info->dtype;
          if (stored != p.target) ++report.converted;
          if (options.zero_copy) {
            const bool aligned =
                p.info->offset % static_cast<uint64_t>(DTypeSize(p.info->dtype)) == 0;
            if (stored == p.target && aligned) {
              absl::StatusOr<std::shared_ptr<const MappedFile>> map = source.Map(p.info->file);
              if (!map.ok()) return map.status();
              std::shared_ptr<const MappedFile> keep = *map;
              void* data = const_cast<char*>(keep->data()) + p.info->offset;
              p.tensor = p.info->nbytes == 0 ? at::empty(p.info->shape, to)
                                             : at::from_blob(
                                                   data, p.info->shape, [keep](void*) {}, to);
              ++report.zero_copy;
              report.loaded_bytes += p.info->nbytes;
              return absl::OkStatus();
            }
            ++report.zero_copy_fallbacks;
          }
          p.tensor = at::empty(p.info->shape, to);
          AdviseHugePages(p.tensor);
          p.needs_copy = true;
          report.loaded_bytes += static_cast<uint64_t>(p.tensor.nbytes());
          count(p.tensor);
          return absl::OkStatus();
        });
    if (!allocated.ok()) return allocated;
    if (!p.needs_copy) continue;
    // Chunks end on element boundaries so each converts on its own.
    const uint64_t item = static_cast<uint64_t>(DTypeSize(p.info->dtype));
    const uint64_t step = std::max(item, options.chunk_bytes / item * item);
    for (uint64_t b = 0, end = 0; b < p.info->nbytes; b = end) {
      end = std::min(p.info->nbytes, b + step);
      chunks.push_back({i, b, end});
    }
    total += p.info->nbytes;
  }

  // Chunks travel through a ring of staging slots off the CPU, when asked, and on the CPU for
  // conversions; unconverted CPU chunks are read straight into their destinations.
  auto staged = [&](const Planned& p) {
    return !device.is_cpu() || options.staged || p.info->dtype != p.target;
  };
  std::unique_ptr<StagedCopier> copier;
  std::unique_ptr<StagingRing> ring;  // declared after copier: goes first
  uint64_t slot_bytes = 0;
  for (const Chunk& c : chunks) {
    if (staged(plan[c.planned])) slot_bytes = std::max(slot_bytes, c.end - c.begin);
  }
  if (slot_bytes > 0) {
    // On a device, two slots per worker keep a read and a copy in flight each; on the CPU copies
    // are synchronous, so one each is enough. More only holds memory.
    const uint64_t cap = std::max<uint64_t>(
        2, (device.is_cpu() ? 1 : 2) * static_cast<uint64_t>(std::max(1, options.threads)));
    const int slots =
        static_cast<int>(std::clamp<uint64_t>(options.staging_bytes / slot_bytes, 2, cap));
    if (device.is_cpu()) {
      copier = std::make_unique<HostCopier>();
    } else {
      copier = std::make_unique<DeviceCopier>(device, slots);
    }
    ring = std::make_unique<StagingRing>(copier.get(), slots, slot_bytes);
    report.staging_slots = slots;
    host_bytes += static_cast<uint64_t>(slots) * slot_bytes;
    // Off the CPU a converting chunk also lands in a device scratch block in its stored dtype
    // (at most a slot's bytes, one per slot in flight).
    bool converts = false;
    for (const Chunk& c : chunks) {
      const Planned& p = plan[c.planned];
      converts |= p.info->dtype != p.target;
    }
    if (!device.is_cpu() && converts) device_bytes += static_cast<uint64_t>(slots) * slot_bytes;
  }

  // Fill: workers take chunks in file order.
  ProgressReporter progress(options.progress, total);
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex error_mu;
  absl::Status error;  // guarded by error_mu
  auto fail = [&](absl::Status s) {
    std::lock_guard<std::mutex> lock(error_mu);
    if (error.ok()) error = std::move(s);
    failed.store(true);
  };
  auto worker = [&] {
    try {
      while (!failed.load(std::memory_order_relaxed)) {
        if (options.cancel != nullptr && options.cancel->load(std::memory_order_relaxed)) {
          fail(absl::CancelledError(absl::StrCat(index.path, ": load cancelled")));
          return;
        }
        const size_t c = next.fetch_add(1);
        if (c >= chunks.size()) return;
        const Chunk& chunk = chunks[c];
        Planned& p = plan[chunk.planned];
        const uint64_t n = chunk.end - chunk.begin;
        const int64_t item = DTypeSize(p.info->dtype);
        const int64_t count = static_cast<int64_t>(n) / item;
        if (staged(p)) {
          const StagingRing::Lease lease = ring->Acquire();
          struct Release {
            StagingRing* ring;
            const StagingRing::Lease& lease;
            ~Release() { ring->Release(lease); }
          } release{ring.get(), lease};
          absl::Status s = source.Read(*p.info, chunk.begin, n, lease.data);
          if (!s.ok()) return fail(std::move(s));
          copier->Copy(
              lease.slot, count, p.info->dtype, p.target,
              p.tensor.view({-1}).narrow(0, static_cast<int64_t>(chunk.begin) / item, count));
        } else {
          char* dst = static_cast<char*>(p.tensor.data_ptr()) + chunk.begin;
          absl::Status s = source.Read(*p.info, chunk.begin, n, dst);
          if (!s.ok()) return fail(std::move(s));
        }
        progress.Add(n);
      }
    } catch (...) {
      fail(CurrentExceptionToStatus(index.path, absl::StatusCode::kInternal));
    }
  };
  const int threads = std::max(1, std::min<int>(options.threads, static_cast<int>(chunks.size())));
  std::vector<std::thread> workers;
  for (int i = 1; i < threads; ++i) workers.emplace_back(worker);
  worker();
  for (std::thread& w : workers) w.join();
  // Every queued copy lands before the destinations are committed or freed.
  if (copier != nullptr) {
    try {
      copier->Finish();
    } catch (...) {
      fail(CurrentExceptionToStatus(index.path, absl::StatusCode::kInternal));
    }
  }
  if (failed.load()) {
    plan.clear();  // frees every destination this load allocated; the module still holds meta
    return error;
  }
  for (const Planned& p : plan) {
    if (p.info != nullptr && p.needs_copy) report.bytes_read += p.info->nbytes;
  }
  // A file rewritten in place while it was read gives a mix of old and new bytes: refuse it.
  if (absl::Status unchanged = source.CheckUnchanged(); !unchanged.ok()) return unchanged;

  // Commit: swap every slot at once, then check nothing is left on meta.
  for (Planned& p : plan) {
    *p.slot.tensor = std::move(p.tensor);
    *p.slot.float8 = IsFloat8(p.target) ? std::optional<DType>(p.target) : std::nullopt;
  }
  for (const TensorSlot& slot : module.Slots()) {
    if (slot.tensor->is_meta()) {
      return absl::InternalError(
          absl::StrCat("tensor '", slot.name, "' is still on meta after loading"));
    }
  }
  report.tensors = static_cast<int>(plan.size());
  progress.Done();

  // Everything counted is held at once (destinations are allocated before the fill starts, and
  // the staging ring lives for the whole fill), so the sum is the load's own peak.
  report.peak_host_bytes = static_cast<int64_t>(host_bytes);
  report.peak_device_bytes = static_cast<int64_t>(device_bytes);
  report.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return report;
}

}  // namespace metaload::core
