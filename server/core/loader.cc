#include "server/core/loader.h"

#include <ATen/ATen.h>
#include <sys/mman.h>

#include <chrono>
#include <mutex>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/core/dtype_policy.h"
#include "server/core/process_memory.h"
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
  at::ScalarType target = at::kFloat;
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

}  // namespace

absl::StatusOr<LoadReport> LoadModule(Module& module, const CheckpointSource& source,
                                      const LoadOptions& options) {
  const auto start = Clock::now();
  absl::StatusOr<c10::Device> device = ParseDevice(options.device);
  if (!device.ok()) return device.status();
  absl::StatusOr<DtypePolicy> policy = DtypePolicy::Create(options.dtype, options.dtype_overrides);
  if (!policy.ok()) return policy.status();
  if (options.zero_copy && !device->is_cpu()) {
    return absl::InvalidArgumentError("zero_copy is only possible on cpu");
  }
  const CheckpointIndex& index = source.index();
  if (index.format == CheckpointFormat::kTorchScript) {
    return absl::FailedPreconditionError(absl::StrCat(
        index.path, ": a TorchScript archive; load it with the torchscript architecture"));
  }

  const int64_t baseline_rss = [] {
    absl::StatusOr<ProcessMemory> m = ReadProcessMemory();
    return m.ok() ? m->rss_bytes : 0;
  }();
  const bool peak_reset = ResetPeakRss();

  // Plan: match module tensors with checkpoint keys, check shapes, choose dtypes.
  LoadReport report;
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
      p.target = slot.tensor->scalar_type();
      plan.push_back(std::move(p));
      continue;
    }
    used.insert(key);
    if (!slot.tensor->sizes().equals(p.info->shape)) {
      return absl::FailedPreconditionError(absl::StrCat(
          index.path, ": key '", key, "': checkpoint has shape ", ShapeString(p.info->shape),
          ", the model expects ", ShapeString(slot.tensor->sizes())));
    }
    p.target = ToScalarType(policy->Resolve(key, p.info->dtype));
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
    const at::TensorOptions to = at::TensorOptions().dtype(p.target).device(*device);
    if (p.info == nullptr) {
      p.tensor = at::zeros(p.slot.tensor->sizes(), to);
      continue;
    }
    const at::ScalarType stored = ToScalarType(p.info->dtype);
    if (stored != p.target) ++report.converted;
    if (options.zero_copy) {
      const bool aligned = p.info->offset % static_cast<uint64_t>(DTypeSize(p.info->dtype)) == 0;
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
        continue;
      }
      ++report.zero_copy_fallbacks;
    }
    p.tensor = at::empty(p.info->shape, to);
    AdviseHugePages(p.tensor);
    p.needs_copy = true;
    report.loaded_bytes += static_cast<uint64_t>(p.tensor.nbytes());
    // Chunks end on element boundaries so each converts on its own.
    const uint64_t item = static_cast<uint64_t>(DTypeSize(p.info->dtype));
    const uint64_t step = std::max(item, options.chunk_bytes / item * item);
    for (uint64_t b = 0, end = 0; b < p.info->nbytes; b = end) {
      end = std::min(p.info->nbytes, b + step);
      chunks.push_back({i, b, end});
    }
    total += p.info->nbytes;
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
    std::vector<char> staging;
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
        const at::ScalarType stored = ToScalarType(p.info->dtype);
        if (device->is_cpu() && stored == p.target) {
          char* dst = static_cast<char*>(p.tensor.data_ptr()) + chunk.begin;
          absl::Status s = source.Read(*p.info, chunk.begin, n, dst);
          if (!s.ok()) return fail(std::move(s));
        } else {
          if (staging.size() < n) staging.resize(n);
          absl::Status s = source.Read(*p.info, chunk.begin, n, staging.data());
          if (!s.ok()) return fail(std::move(s));
          const int64_t item = DTypeSize(p.info->dtype);
          const int64_t count = static_cast<int64_t>(n) / item;
          at::Tensor src =
              at::from_blob(staging.data(), {count}, at::TensorOptions().dtype(stored));
          at::Tensor dst =
              p.tensor.view({-1}).narrow(0, static_cast<int64_t>(chunk.begin) / item, count);
          if (device->is_cpu()) {
            dst.copy_(src);  // converts on the CPU
          } else {
            // Move the stored bytes to the device first, then convert there.
            dst.copy_(src.to(*device, /*non_blocking=*/false, /*copy=*/true));
          }
        }
        progress.Add(n);
      }
    } catch (const std::exception& e) {
      fail(absl::InternalError(absl::StrCat(index.path, ": ", e.what())));
    }
  };
  const int threads = std::max(1, std::min<int>(options.threads, static_cast<int>(chunks.size())));
  std::vector<std::thread> workers;
  for (int i = 1; i < threads; ++i) workers.emplace_back(worker);
  worker();
  for (std::thread& w : workers) w.join();
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
  for (Planned& p : plan) *p.slot.tensor = std::move(p.tensor);
  for (const TensorSlot& slot : module.Slots()) {
    if (slot.tensor->is_meta()) {
      return absl::InternalError(
          absl::StrCat("tensor '", slot.name, "' is still on meta after loading"));
    }
  }
  report.tensors = static_cast<int>(plan.size());
  progress.Done();

  absl::StatusOr<ProcessMemory> after = ReadProcessMemory();
  if (after.ok()) {
    report.peak_host_bytes = std::max<int64_t>(
        0, (peak_reset ? after->peak_rss_bytes : after->rss_bytes) - baseline_rss);
  }
  report.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return report;
}

}  // namespace metaload::core
