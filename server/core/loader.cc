#include "server/core/loader.h"

#include <ATen/ATen.h>
#include <sys/mman.h>

#include <chrono>
#include <optional>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/core/dtype_policy.h"
#include "server/core/exception_boundary.h"
#include "server/core/float8_convert.h"
#include "server/core/mutex.h"
#include "server/core/staging_copier.h"
#include "server/core/staging_ring.h"
#include "server/core/torch_types.h"

namespace metaload::core {
namespace {

using Clock = std::chrono::steady_clock;

constexpr size_t kMissingKeysShown = 20;

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
// (server/README.md, "Measured facts"). Asking for transparent huge pages before the first touch
// cuts the faults ~500-fold where the kernel allows it (THP "madvise" mode, the Debian default).
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

// Everything one load builds, phase by phase (LoadModule's Plan, Allocate, Fill, Commit).
// Member order is teardown order reversed: the ring goes before its copier, and both before the
// destinations they write into.
struct LoadState {
  std::vector<Planned> plan;
  std::vector<Chunk> chunks;  // in file order
  uint64_t fill_bytes = 0;    // what the fill reads
  LoadReport report;
  // What this load allocates itself, by where: its peak, counted rather than sampled from the
  // process (whose high-water mark other loads share). See LoadReport::peak_host_bytes.
  uint64_t host_bytes = 0;
  uint64_t device_bytes = 0;
  // With a host arena: the block the copied CPU destinations are carved from, and how much of
  // it is carved so far.
  std::shared_ptr<HostBlock> block;
  uint64_t block_used = 0;
  std::unique_ptr<StagedCopier> copier;
  std::unique_ptr<StagingRing> ring;

  void Count(const at::Tensor& t) {
    (t.is_cpu() ? host_bytes : device_bytes) += static_cast<uint64_t>(t.nbytes());
  }
};

// Chunks travel through the staging ring off the CPU, when asked, and on the CPU for
// conversions; unconverted CPU chunks are read straight into their destinations.
bool Staged(const Planned& p, const LoadOptions& options) {
  return !options.device.is_cpu() || options.staged || p.info->dtype != p.target;
}

// Plan: match the module's tensors with checkpoint keys, check shapes and kinds, choose dtypes.
// Nothing is allocated.
absl::Status Plan(Module& module, const CheckpointIndex& index, const LoadOptions& options,
                  LoadState* state) {
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
      state->plan.push_back(std::move(p));
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
    p.target = options.policy.Resolve(key, p.info->dtype, slot.use);
    state->plan.push_back(std::move(p));
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
  state->report.missing_keys = std::move(missing);
  for (const TensorInfo& t : index.tensors) {
    if (!used.count(t.name)) state->report.unexpected_keys.push_back(t.name);
  }
  return absl::OkStatus();
}

// Destinations carved from an arena block start on a cache line.
constexpr uint64_t kBlockAlign = 64;

// The shape a planned tensor loads with: the file's, or the module's for a zero-filled key.
at::IntArrayRef Shape(const Planned& p) {
  return p.info != nullptr ? at::IntArrayRef(p.info->shape) : p.slot.tensor->sizes();
}

// A destination's bytes in the arena block: in the dtype it loads as, rounded up.
uint64_t BlockBytes(const Planned& p) {
  const uint64_t bytes = static_cast<uint64_t>(c10::multiply_integers(Shape(p))) *
                         c10::elementSize(ToScalarType(p.target));
  return (bytes + kBlockAlign - 1) & ~(kBlockAlign - 1);
}

// Whether a planned tensor views the file's mapping instead of being copied (zero_copy, no
// conversion, aligned bytes).
bool ViewsMapping(const Planned& p, const LoadOptions& options) {
  return options.zero_copy && p.info->dtype == p.target &&
         p.info->offset % static_cast<uint64_t>(DTypeSize(p.info->dtype)) == 0;
}

// With a host arena on the CPU: one block for every destination the fill copies into, and the
// zero-filled ones (all the memory the load's admission counted, so that none is fresh).
absl::Status TakeBlock(const CheckpointIndex& index, const LoadOptions& options, LoadState* state) {
  if (options.host_arena == nullptr || !options.device.is_cpu()) return absl::OkStatus();
  uint64_t total = 0;
  for (const Planned& p : state->plan) {
    if (p.info == nullptr || !ViewsMapping(p, options)) total += BlockBytes(p);
  }
  if (total == 0) return absl::OkStatus();
  absl::StatusOr<std::shared_ptr<HostBlock>> block = options.host_arena->Take(total);
  if (!block.ok()) {
    return absl::Status(block.status().code(),
                        absl::StrCat(index.path, ": ", block.status().message()));
  }
  state->block = *std::move(block);
  state->report.arena_reused_bytes = std::min(total, state->block->reused_bytes());
  return absl::OkStatus();
}

// One planned tensor's destination: zeros for a missing key, a view of the mapping for a
// zero-copy one, else memory that the fill writes: carved from the arena's block, or fresh (no
// page touched yet).
absl::Status AllocateOne(const CheckpointSource& source, const LoadOptions& options, Planned& p,
                         LoadState* state) {
  LoadReport& report = state->report;
  const at::TensorOptions to =
      at::TensorOptions().dtype(ToScalarType(p.target)).device(options.device);
  // Carves the next destination out of the arena's block; nullopt without one.
  auto carve = [&]() -> std::optional<at::Tensor> {
    const uint64_t bytes = BlockBytes(p);
    if (state->block == nullptr || bytes == 0) return std::nullopt;
    std::shared_ptr<HostBlock> block = state->block;
    char* data = block->data() + state->block_used;
    state->block_used += bytes;
    return at::from_blob(
        data, Shape(p), [block](void*) {}, to);
  };
  if (p.info == nullptr) {
    std::optional<at::Tensor> carved = carve();
    p.tensor = carved ? carved->zero_() : at::zeros(p.slot.tensor->sizes(), to);
    state->Count(p.tensor);
    return absl::OkStatus();
  }
  const DType stored = p.info->dtype;
  if (stored != p.target) ++report.converted;
  if (options.zero_copy) {
    if (ViewsMapping(p, options)) {
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
  if (std::optional<at::Tensor> carved = carve()) {
    p.tensor = *std::move(carved);
  } else {
    p.tensor = at::empty(p.info->shape, to);
    AdviseHugePages(p.tensor);
  }
  p.needs_copy = true;
  report.loaded_bytes += static_cast<uint64_t>(p.tensor.nbytes());
  state->Count(p.tensor);
  return absl::OkStatus();
}

// Allocate: every destination, the chunks that fill them, and the staging ring those chunks
// need. Allocation is where a load meets the machine's limits (a CUDA OOM, a CPU allocation the
// kernel refuses): RESOURCE_EXHAUSTED naming the key, never an exception.
absl::Status Allocate(const CheckpointSource& source, const LoadOptions& options,
                      LoadState* state) {
  const CheckpointIndex& index = source.index();
  if (absl::Status taken = TakeBlock(index, options, state); !taken.ok()) return taken;
  for (size_t i = 0; i < state->plan.size(); ++i) {
    Planned& p = state->plan[i];
    absl::Status allocated = CatchExceptions(
        absl::StrCat(index.path, ": key '", p.info != nullptr ? p.info->name : p.slot.name, "'"),
        [&] { return AllocateOne(source, options, p, state); });
    if (!allocated.ok()) return allocated;
    if (!p.needs_copy) continue;
    // Chunks end on element boundaries so each converts on its own.
    const uint64_t item = static_cast<uint64_t>(DTypeSize(p.info->dtype));
    const uint64_t step = std::max(item, options.chunk_bytes / item * item);
    for (uint64_t b = 0, end = 0; b < p.info->nbytes; b = end) {
      end = std::min(p.info->nbytes, b + step);
      state->chunks.push_back({i, b, end});
    }
    state->fill_bytes += p.info->nbytes;
  }

  uint64_t slot_bytes = 0;
  bool converts = false;
  for (const Chunk& c : state->chunks) {
    const Planned& p = state->plan[c.planned];
    if (Staged(p, options)) slot_bytes = std::max(slot_bytes, c.end - c.begin);
    converts |= p.info->dtype != p.target;
  }
  if (slot_bytes == 0) return absl::OkStatus();
  // On a device, two slots per worker keep a read and a copy in flight each; on the CPU copies
  // are synchronous, so one each is enough. More only holds memory.
  const bool cpu = options.device.is_cpu();
  const uint64_t cap =
      std::max<uint64_t>(2, (cpu ? 1 : 2) * static_cast<uint64_t>(std::max(1, options.threads)));
  const int slots =
      static_cast<int>(std::clamp<uint64_t>(options.staging_bytes / slot_bytes, 2, cap));
  return CatchExceptions(absl::StrCat(index.path, ": staging ring"), [&] {
    state->copier = MakeStagedCopier(options.device, slots);
    state->ring = std::make_unique<StagingRing>(state->copier.get(), slots, slot_bytes);
    state->report.staging_slots = slots;
    state->host_bytes += static_cast<uint64_t>(slots) * slot_bytes;
    // Off the CPU a converting chunk also lands in a device scratch block in its stored dtype
    // (at most a slot's bytes, one per slot in flight).
    if (!cpu && converts) state->device_bytes += static_cast<uint64_t>(slots) * slot_bytes;
    return absl::OkStatus();
  });
}

// Fill: `options.threads` workers take chunks in file order until all are read (and copied) or
// one fails or the load is cancelled; then every queued copy lands.
absl::Status Fill(const CheckpointSource& source, const LoadOptions& options,
                  ProgressReporter& progress, LoadState* state) {
  const CheckpointIndex& index = source.index();
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  Mutex error_mu;
  absl::Status error;  // the first failure; written under error_mu, read after the join
  auto fail = [&](absl::Status s) {
    MutexLock lock(&error_mu);
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
        if (c >= state->chunks.size()) return;
        const Chunk& chunk = state->chunks[c];
        Planned& p = state->plan[chunk.planned];
        const uint64_t n = chunk.end - chunk.begin;
        const int64_t item = DTypeSize(p.info->dtype);
        const int64_t count = static_cast<int64_t>(n) / item;
        if (Staged(p, options)) {
          StagingRing& ring = *state->ring;
          const StagingRing::Lease lease = ring.Acquire();
          struct Release {
            StagingRing& ring;
            const StagingRing::Lease& lease;
            ~Release() { ring.Release(lease); }
          } release{ring, lease};
          absl::Status s = source.Read(*p.info, chunk.begin, n, lease.data);
          if (!s.ok()) return fail(std::move(s));
          state->copier->Copy(
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
  const int threads =
      std::max(1, std::min<int>(options.threads, static_cast<int>(state->chunks.size())));
  std::vector<std::thread> workers;
  for (int i = 1; i < threads; ++i) workers.emplace_back(worker);
  worker();
  for (std::thread& w : workers) w.join();
  // Every queued copy lands before the destinations are committed or freed.
  if (state->copier != nullptr) {
    try {
      state->copier->Finish();
    } catch (...) {
      fail(CurrentExceptionToStatus(index.path, absl::StatusCode::kInternal));
    }
  }
  if (failed.load()) {
    MutexLock lock(&error_mu);
    return error;
  }
  for (const Planned& p : state->plan) {
    if (p.info != nullptr && p.needs_copy) state->report.bytes_read += p.info->nbytes;
  }
  return absl::OkStatus();
}

// Commit: refuse a file rewritten in place while it was read (a mix of old and new bytes), then
// swap every slot at once and check nothing is left on meta.
absl::Status Commit(Module& module, const CheckpointSource& source, LoadState* state) {
  if (absl::Status unchanged = source.CheckUnchanged(); !unchanged.ok()) return unchanged;
  for (Planned& p : state->plan) {
    *p.slot.tensor = std::move(p.tensor);
    *p.slot.float8 = IsFloat8(p.target) ? std::optional<DType>(p.target) : std::nullopt;
  }
  for (const TensorSlot& slot : module.Slots()) {
    if (slot.tensor->is_meta()) {
      return absl::InternalError(
          absl::StrCat("tensor '", slot.name, "' is still on meta after loading"));
    }
  }
  state->report.tensors = static_cast<int>(state->plan.size());
  return absl::OkStatus();
}

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
  if (absl::Status checked = CheckLoadOptions(options); !checked.ok()) return checked;
  const CheckpointIndex& index = source.index();
  if (index.format == CheckpointFormat::kTorchScript) {
    return absl::FailedPreconditionError(absl::StrCat(
        index.path, ": a TorchScript archive; load it with the torchscript architecture"));
  }
  // On any failure `state` goes with this frame: the ring, the copier (after its copies land),
  // then every destination; the module still holds meta.
  LoadState state;
  if (absl::Status s = Plan(module, index, options, &state); !s.ok()) return s;
  if (absl::Status s = Allocate(source, options, &state); !s.ok()) return s;
  ProgressReporter progress(options.progress, state.fill_bytes);
  if (absl::Status s = Fill(source, options, progress, &state); !s.ok()) return s;
  if (absl::Status s = Commit(module, source, &state); !s.ok()) return s;
  progress.Done();

  // Everything counted is held at once (destinations are allocated before the fill starts, and
  // the staging ring lives for the whole fill), so the sum is the load's own peak.
  LoadReport report = std::move(state.report);
  report.peak_host_bytes = static_cast<int64_t>(state.host_bytes);
  report.peak_device_bytes = static_cast<int64_t>(state.device_bytes);
  report.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return report;
}

}  // namespace metaload::core
