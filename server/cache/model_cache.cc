#include "server/cache/model_cache.h"

#include <ATen/ATen.h>
#include <dirent.h>
#include <malloc.h>
#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <future>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "server/cache/tensor_codec.h"
#include "server/core/byte_size.h"
#include "server/core/checkpoint.h"
#include "server/core/checksum_store.h"
#include "server/core/dtype_policy.h"
#include "server/core/exception_boundary.h"
#include "server/core/log.h"
#include "server/core/thread_pool.h"
#include "server/core/torch_types.h"
#include "server/models/registry.h"

namespace metaload::cache {

using Clock = std::chrono::steady_clock;

int64_t NowMs() { return absl::ToUnixMillis(absl::Now()); }

// A process-wide use counter: strictly increasing, unlike wall-clock milliseconds.
uint64_t NextUse() {
  static std::atomic<uint64_t> counter{0};
  return counter.fetch_add(1) + 1;
}

// ModelInfo.dtype carries at most this much of the policy's description, so one caller's
// model cannot make ListModels too large for everyone (issue 17: three loads of 100,000
// overrides did). The description is cut at an override's end and says how many are left out.
constexpr size_t kMaxInfoDtypeBytes = 1024;

std::string BoundedDtype(std::string described) {
  if (described.size() <= kMaxInfoDtypeBytes) return described;
  const size_t room = kMaxInfoDtypeBytes - 48;  // for the suffix
  size_t cut = described.rfind(';', room);
  if (cut == std::string::npos) cut = room;
  const int64_t left_out = std::count(described.begin() + cut, described.end(), ';');
  described.resize(cut);
  absl::StrAppend(&described, ";...(", left_out, " more overrides; see the request)");
  return described;
}

// Frees models off the cache's lock and off the callers' threads (gRPC's among them): a
// model's last handle, wherever it drops, only queues the model here, and one thread frees it
// and hands the pages back to the kernel (malloc_trim). Admission stops counting a model once
// it is queued, so every load waits (Flush, on its load thread) for the frees queued before it
// to finish before it allocates: the budget holds in real memory, not only in the books.
// Thread-safe; destruction runs every queued free, then joins.
class Releaser {
 public:
  explicit Releaser(CacheObserver* observer) : observer_(observer) {}

  void Release(std::unique_ptr<models::Model> model, const std::string& device, int64_t bytes) {
    if (!model) return;
    std::shared_ptr<models::Model> doomed = std::move(model);  // the pool's tasks are copyable
    pool_.Submit([observer = observer_, doomed = std::move(doomed), device, bytes]() mutable {
      const auto start = Clock::now();
      doomed.reset();
      ::malloc_trim(0);
      if (observer) {
        observer->OnModelFreed(device, bytes,
                               std::chrono::duration<double>(Clock::now() - start).count());
      }
    });
  }

  // Returns once every free queued before the call is done. Never call it on the release
  // thread (an observer's OnModelFreed) or under the cache's lock.
  void Flush() {
    std::promise<void> done;
    pool_.Submit([&done] { done.set_value(); });
    done.get_future().wait();
  }

 private:
  CacheObserver* const observer_;
  core::ThreadPool pool_{1};
};

// One loaded model; shared by every model_id that names its key, and by running Infers.
struct Loaded {
  // The last handle may drop under the cache's lock or on a gRPC thread: the model is freed
  // (and the pages handed back to the kernel at once, since RAM that is never returned on
  // model switches is the web UI users' top complaint about loaders) on the release thread.
  ~Loaded() {
    if (releaser) releaser->Release(std::move(model), device, resident_bytes);
  }

  std::shared_ptr<Releaser> releaser;

  std::string key, path, architecture, device, dtype;
  std::unique_ptr<models::Model> model;
  std::vector<core::CheckpointFile> files;
  int64_t parameter_count = 0, resident_bytes = 0, loaded_at_ms = 0;
  std::vector<models::EntrySpec> entries;
  LoadStats stats;
  bool pinned = false;
  std::atomic<int64_t> last_used_ms{0};
  // Order of last use, for LRU eviction: milliseconds tie when a load and a hit land in the same
  // one (ServiceBudgetTest evicted the model it had just used, 2 runs in 4).
  std::atomic<uint64_t> last_use{0};
  std::atomic<int64_t> infer_count{0};
  std::atomic<int> active{0};  // Infers holding it; only through InUse
  std::mutex hash_mu;
  std::string sha256;  // guarded by hash_mu
};

// One Infer's hold on a model: eviction skips a model while any is alive. RAII, so no exception
// or early return can leave a model counted as in use (and so unevictable) for ever.
class InUse {
 public:
  // Call under the cache's lock, so an eviction deciding right now sees it.
  explicit InUse(std::shared_ptr<Loaded> loaded) : loaded_(std::move(loaded)) {
    loaded_->active.fetch_add(1);
  }
  ~InUse() { Release(); }
  // Ends the hold early (before a done callback that may want the model evicted).
  void Release() {
    if (loaded_) loaded_->active.fetch_sub(1);
    loaded_.reset();
  }
  InUse(const InUse&) = delete;
  InUse& operator=(const InUse&) = delete;
  const std::shared_ptr<Loaded>& get() const { return loaded_; }

 private:
  std::shared_ptr<Loaded> loaded_;
};

// Errors from below name the resolved absolute path; the caller sees the path it gave.
absl::Status AsCallerSees(const absl::Status& status, const LoadSpec& spec) {
  if (status.ok() || spec.path.empty() || spec.path == spec.display_path) return status;
  std::string message(status.message());
  for (size_t at = message.find(spec.path); at != std::string::npos;
       at = message.find(spec.path, at + spec.display_path.size())) {
    message.replace(at, spec.path.size(), spec.display_path);
  }
  return absl::Status(status.code(), message);
}

struct Flight {
  std::string key;
  LoadSpec spec;
  // The request's device and dtypes, parsed once (by ModelCache::Load).
  c10::Device device = c10::kCPU;
  std::optional<core::DtypePolicy> requested;  // nullopt: the architecture's default
  std::atomic<bool> cancel{false};
  std::vector<std::shared_ptr<LoadWaiter>> waiters;  // guarded by the cache's mu_
};

struct ModelCache::Slot {
  std::shared_ptr<Loaded> current;
  std::shared_ptr<Flight> pending;
};

ModelCache::ModelCache(Options options)
    : options_(std::move(options)),
      releaser_(std::make_shared<Releaser>(options_.observer)),
      load_pool_(std::make_unique<core::ThreadPool>(options_.load_threads,
                                                    core::InitIntraOpThreadsForThisThread)),
      infer_pool_(std::make_unique<core::ThreadPool>(options_.infer_threads,
                                                     core::InitIntraOpThreadsForThisThread)),
      hash_pool_(std::make_unique<core::ThreadPool>(1)) {}

ModelCache::~ModelCache() {
  stopping_.store(true);  // stops a checksum in progress (a 10 GB file takes seconds)
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [key, flight] : flights_) flight->cancel.store(true);
  }
  load_pool_.reset();
  infer_pool_.reset();
  hash_pool_.reset();
}

bool LoadWaiter::Cancel() {
  {
    std::lock_guard<std::mutex> lock(callback_mu_);
    if (finished_) return false;
    cancelled_ = true;
  }
  return cache_->CancelWaiter(this);
}

void LoadWaiter::Deliver(const LoadProgressEvent& event) {
  std::lock_guard<std::mutex> lock(callback_mu_);
  if (!cancelled_ && !finished_ && progress_) progress_(event);
}

void LoadWaiter::Finish(absl::StatusOr<LoadResult> result) {
  std::lock_guard<std::mutex> lock(callback_mu_);
  if (cancelled_ || finished_) return;
  finished_ = true;
  done_(std::move(result));
}

bool ModelCache::CancelWaiter(LoadWaiter* waiter) {
  std::lock_guard<std::mutex> lock(mu_);
  std::shared_ptr<Flight> flight = waiter->flight_.lock();
  if (flight == nullptr) return true;
  auto& ws = flight->waiters;
  ws.erase(
      std::remove_if(ws.begin(), ws.end(),
                     [waiter](const std::shared_ptr<LoadWaiter>& w) { return w.get() == waiter; }),
      ws.end());
  bool id_still_waiting = false;
  for (const auto& w : ws) id_still_waiting |= w->model_id_ == waiter->model_id_;
  if (!id_still_waiting) {
    auto it = slots_.find(waiter->model_id_);
    if (it != slots_.end() && it->second->pending == flight) {
      it->second->pending = nullptr;
      if (it->second->current == nullptr) slots_.erase(it);
    }
  }
  // The load stops only when nobody wants it any more.
  if (ws.empty()) flight->cancel.store(true);
  return true;
}

namespace {

// One file's identity: what changes when its bytes do. ctime too, since `touch -d` can put
// mtime back but nothing can put ctime back.
void AppendIdentity(const struct stat& st, std::string* out) {
  absl::StrAppend(out, st.st_dev, ":", st.st_ino, ":", st.st_size, ":", st.st_mtim.tv_sec, ".",
                  st.st_mtim.tv_nsec, ":", st.st_ctim.tv_sec, ".", st.st_ctim.tv_nsec);
}

// Directories are walked this deep (a diffusers layout keeps its networks one level down) and
// at most this many entries are looked at; past it the key is unique to this call, so a
// directory that large is never a cache hit rather than a stale one.
constexpr int kMaxIdentityDepth = 2;
constexpr int kMaxIdentityEntries = 4096;

void AppendTreeIdentity(const std::string& dir, int depth, int* budget, std::string* out) {
  std::vector<std::string> names;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (struct dirent* e = ::readdir(d)) {
      const std::string name = e->d_name;
      if (name == "." || name == "..") continue;
      if (--*budget < 0) break;
      names.push_back(name);
    }
    ::closedir(d);
  }
  std::sort(names.begin(), names.end());
  for (const std::string& name : names) {
    const std::string path = absl::StrCat(dir, "/", name);
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) continue;
    if (S_ISDIR(st.st_mode)) {
      if (depth + 1 < kMaxIdentityDepth) {
        absl::StrAppend(out, "|", name, "/");
        AppendTreeIdentity(path, depth + 1, budget, out);
      }
    } else if (S_ISREG(st.st_mode)) {
      absl::StrAppend(out, "|", name, "=");
      AppendIdentity(st, out);
    }
  }
}

// The identity part of the cache key. A Hugging Face directory is keyed by every file in it
// (each shard, the index, config.json): its own stat does not change when a shard is
// rewritten in place (issue 17: a stale cache hit on the old weights).
std::string FileIdentityKey(const std::string& path, const struct stat& st) {
  std::string key;
  AppendIdentity(st, &key);
  if (S_ISDIR(st.st_mode)) {
    int budget = kMaxIdentityEntries;
    AppendTreeIdentity(path, 0, &budget, &key);
    if (budget < 0) absl::StrAppend(&key, "|uncacheable:", NextUse());
  }
  return key;
}

// "compute=default" or "compute=bfloat16;vae_decode=float32" (by_entry is ordered).
std::string ComputeKey(const models::ComputeChoice& compute) {
  std::string key =
      absl::StrCat("compute=", compute.dtype ? core::DTypeName(*compute.dtype) : "default");
  for (const auto& [entry, dtype] : compute.by_entry) {
    absl::StrAppend(&key, ";", entry, "=", core::DTypeName(dtype));
  }
  return key;
}

}  // namespace

std::shared_ptr<LoadWaiter> ModelCache::Load(const LoadSpec& spec, ProgressFn progress,
                                             DoneFn done) {
  auto waiter = std::shared_ptr<LoadWaiter>(new LoadWaiter());
  waiter->cache_ = this;
  waiter->model_id_ = spec.model_id;
  waiter->progress_ = std::move(progress);
  waiter->done_ = std::move(done);

  absl::StatusOr<std::optional<core::DtypePolicy>> requested =
      core::DtypePolicy::FromRequest(spec.dtype, spec.dtype_overrides);
  absl::StatusOr<c10::Device> device = core::ParseDevice(spec.device);
  struct stat st;
  absl::Status early;
  if (!requested.ok()) {
    early = requested.status();
  } else if (!device.ok()) {
    early = device.status();
  } else if (spec.zero_copy && !device->is_cpu()) {
    early = absl::InvalidArgumentError("zero_copy is only possible on cpu");
  } else if (::stat(spec.path.c_str(), &st) != 0) {
    early = absl::NotFoundError(absl::StrCat("path '", spec.display_path, "' does not exist"));
  }
  if (!early.ok()) {
    waiter->Finish(early);
    return waiter;
  }
  LoadSpec canonical = spec;
  canonical.device = device->str();
  const std::string key = absl::StrCat(
      spec.path, "|", FileIdentityKey(spec.path, st), "|", spec.architecture, "|", canonical.device,
      "|",
      // "" means the architecture's default dtypes, "keep" the file's: different models.
      *requested ? (*requested)->Describe() : "default", "|", ComputeKey(spec.compute), "|",
      spec.zero_copy ? "zero_copy" : "copy", spec.allow_missing_keys ? "|allow_missing" : "");

  std::unique_lock<std::mutex> lock(mu_);
  std::unique_ptr<Slot>& slot = slots_[spec.model_id];
  if (!slot) slot = std::make_unique<Slot>();
  if (slot->current && slot->current->key == key && !slot->pending) {
    std::shared_ptr<Loaded> loaded = slot->current;
    loaded->last_used_ms = NowMs();
    loaded->last_use = NextUse();
    LoadResult result{InfoLocked(spec.model_id, *loaded, "READY"), true, loaded->stats};
    lock.unlock();
    if (options_.observer) options_.observer->OnCacheRequest("hit");
    waiter->Finish(std::move(result));
    return waiter;
  }
  // A flight whose callers all left is being torn down: a newcomer never joins it (it would get
  // their CANCELLED), it starts a load of its own below.
  if (slot->pending && slot->pending->key == key && !slot->pending->cancel.load()) {
    slot->pending->waiters.push_back(waiter);
    waiter->flight_ = slot->pending;
    lock.unlock();
    if (options_.observer) options_.observer->OnCacheRequest("coalesced");
    return waiter;
  }
  if (slot->pending && !slot->pending->cancel.load()) {
    // Copied under the lock: once it is released, Unload may erase the slot.
    const std::string other = slot->pending->spec.display_path;
    lock.unlock();
    waiter->Finish(
        absl::AlreadyExistsError(absl::StrCat("model_id '", spec.model_id, "' is already loading '",
                                              other, "'; wait for it or unload it first")));
    return waiter;
  }
  if (slot->current && !spec.replace) {
    const std::string other = slot->current->path;
    lock.unlock();
    waiter->Finish(absl::AlreadyExistsError(
        absl::StrCat("model_id '", spec.model_id, "' already holds '", other,
                     "' (other options or file); pass replace to swap it")));
    return waiter;
  }
  // Another id already holds or is loading the same key: share it.
  for (const std::weak_ptr<Loaded>& weak : alive_) {
    std::shared_ptr<Loaded> loaded = weak.lock();
    if (loaded && loaded->key == key) {
      slot->current = loaded;
      loaded->last_used_ms = NowMs();
      loaded->last_use = NextUse();
      LoadResult result{InfoLocked(spec.model_id, *loaded, "READY"), true, loaded->stats};
      lock.unlock();
      if (options_.observer) options_.observer->OnCacheRequest("hit");
      waiter->Finish(std::move(result));
      return waiter;
    }
  }
  auto existing = flights_.find(key);
  if (existing != flights_.end() && !existing->second->cancel.load()) {
    existing->second->waiters.push_back(waiter);
    waiter->flight_ = existing->second;
    slot->pending = existing->second;
    lock.unlock();
    if (options_.observer) options_.observer->OnCacheRequest("coalesced");
    return waiter;
  }
  auto flight = std::make_shared<Flight>();
  flight->key = key;
  flight->spec = canonical;
  flight->device = *device;
  flight->requested = *std::move(requested);
  flight->waiters.push_back(waiter);
  waiter->flight_ = flight;
  flights_[key] = flight;
  slot->pending = flight;
  ++queued_;
  lock.unlock();
  if (options_.observer) options_.observer->OnCacheRequest("miss");
  waiter->Deliver({"queued", 0, 0});
  load_pool_->Submit([this, flight] { RunFlight(flight); });
  return waiter;
}

int64_t ModelCache::UsedBytesLocked(const std::string& device) const {
  int64_t used = 0;
  for (const std::weak_ptr<Loaded>& weak : alive_) {
    std::shared_ptr<Loaded> loaded = weak.lock();
    if (loaded && loaded->device == device) used += loaded->resident_bytes;
  }
  auto r = reserved_.find(device);
  return used + (r == reserved_.end() ? 0 : r->second);
}

namespace {

// Byte figures are admitted as int64; a saturated estimate (a config claiming 2^70 elements)
// must stay far from overflowing `used + need`.
constexpr int64_t kMaxAdmittedBytes = INT64_MAX / 4;

// Of the memory free at an admission, the share a following budget may promise (the same
// share the daemon's default budget takes of MemAvailable at start).
constexpr double kAvailableFraction = 0.8;

}  // namespace

int64_t ModelCache::ClampBytes(uint64_t bytes) {
  return static_cast<int64_t>(std::min<uint64_t>(bytes, kMaxAdmittedBytes));
}

int64_t ModelCache::AvailableBytes(const std::string& device) {
  if (!options_.budget_follows_available.count(device)) return -1;
  // Frees queued before now count as free: let them finish first (a checkpoint switch).
  releaser_->Flush();
  return options_.available_bytes ? options_.available_bytes(device) : -1;
}

int64_t ModelCache::ResidentBytesLocked(const std::string& device) const {
  int64_t held = 0;
  for (const std::weak_ptr<Loaded>& weak : alive_) {
    std::shared_ptr<Loaded> loaded = weak.lock();
    if (loaded && loaded->device == device) held += loaded->resident_bytes;
  }
  return held;
}

absl::Status ModelCache::AdmitLocked(const Flight& flight, int64_t need, int64_t available,
                                     const char* verb, std::vector<std::string>* evicted) {
  const LoadSpec& spec = flight.spec;
  auto budget = options_.budgets.find(spec.device);
  if (budget != options_.budgets.end()) {
    // The effective budget: the configured one, and where it follows what is free, at most
    // what the cache's models hold now plus the free fraction of what the device has free now.
    // Fixed for this admission, so evicting a model makes room by its bytes.
    int64_t limit = budget->second;
    if (available >= 0) {
      limit = std::min(limit, ResidentBytesLocked(spec.device) +
                                  static_cast<int64_t>(available * kAvailableFraction));
    }
    // Nothing is evicted for a load that would not fit even with every idle model gone.
    int64_t evictable = 0;
    std::set<const Loaded*> counted;
    for (const auto& [id, slot] : slots_) {
      const Loaded* l = slot->current.get();
      if (!l || l->device != spec.device || l->pinned || l->active.load() > 0) continue;
      if (counted.insert(l).second) evictable += l->resident_bytes;
    }
    const bool can_fit = UsedBytesLocked(spec.device) - evictable + need <= limit;
    // A model being replaced serves until its successor is ready, unless the budget cannot
    // hold both: then the swap becomes unload-then-load (the web UI's checkpoint switch).
    bool spare_replaced = true;
    while (can_fit && UsedBytesLocked(spec.device) + need > limit) {
      std::string victim;
      uint64_t oldest = UINT64_MAX;
      for (const auto& [id, slot] : slots_) {
        const std::shared_ptr<Loaded>& l = slot->current;
        if (!l || l->device != spec.device || l->pinned || l->active.load() > 0) continue;
        bool wanted = false;
        for (const auto& w : flight.waiters) wanted |= w->model_id_ == id;
        if (wanted && spare_replaced) continue;
        if (l->last_use.load() < oldest) {
          oldest = l->last_use.load();
          victim = id;
        }
      }
      if (victim.empty() && spare_replaced) {
        spare_replaced = false;
        continue;
      }
      if (victim.empty()) break;
      std::shared_ptr<Loaded> gone = slots_[victim]->current;
      for (auto it = slots_.begin(); it != slots_.end();) {
        if (it->second->current == gone) {
          evicted->push_back(it->first);
          it->second->current = nullptr;
          if (!it->second->pending) {
            it = slots_.erase(it);
            continue;
          }
        }
        ++it;
      }
      gone.reset();
      alive_.erase(std::remove_if(alive_.begin(), alive_.end(),
                                  [](const std::weak_ptr<Loaded>& w) { return w.expired(); }),
                   alive_.end());
      if (options_.observer) options_.observer->OnEviction(spec.device);
    }
    const int64_t used = UsedBytesLocked(spec.device);
    if (used + need > limit) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "'", spec.display_path, "' ", verb, " ", core::HumanBytes(need), " on ", spec.device,
          "; the budget is ", core::HumanBytes(limit),
          limit < budget->second ? absl::StrCat(" (", core::HumanBytes(budget->second),
                                                " capped by what the models hold plus 80% of the ",
                                                core::HumanBytes(available), " free now)")
                                 : "",
          " and ", core::HumanBytes(used), " is held by models in use or pinned"));
    }
  }
  reserved_[spec.device] += need;
  return absl::OkStatus();
}

void ModelCache::ReportEvictedLocked(const std::string& device,
                                     const std::vector<std::string>& evicted) {
  for (const std::string& id : evicted) {
    core::LogInfo("model_evicted").Kv("model_id", id).Kv("device", device);
    if (options_.observer) options_.observer->OnModelRemoved(id);
  }
}

void ModelCache::RunFlight(std::shared_ptr<Flight> flight) {
  const LoadSpec& spec = flight->spec;
  const auto start = Clock::now();
  auto broadcast = [this, &flight](const LoadProgressEvent& e) {
    std::vector<std::shared_ptr<LoadWaiter>> waiters;
    {
      std::lock_guard<std::mutex> lock(mu_);
      waiters = flight->waiters;
    }
    for (const auto& w : waiters) w->Deliver(e);
  };
  {
    std::lock_guard<std::mutex> lock(mu_);
    --queued_;
    running_[flight.get()] = Clock::now();
  }
  int64_t reserved = 0;
  std::shared_ptr<Loaded> loaded;
  absl::Status status;
  std::unique_ptr<models::Model> model;
  core::LoadReport report;
  double build_seconds = 0;
  do {
    if (flight->cancel.load()) {
      status = absl::CancelledError(absl::StrCat("load of '", spec.display_path, "' cancelled"));
      break;
    }
    broadcast({"build", 0, 0});
    core::CheckpointSource::Options source_options;
    source_options.roots = options_.model_roots;
    absl::StatusOr<std::unique_ptr<core::CheckpointSource>> source = core::CatchExceptions(
        spec.path, [&] { return core::CheckpointSource::Open(spec.path, source_options); });
    if (!source.ok()) {
      status = source.status();
      break;
    }
    // A TorchScript archive is a program: loading it runs its code (__setstate__, and forward
    // on every Infer). Only an operator who trusts every model root may allow it.
    if (((*source)->index().format == core::CheckpointFormat::kTorchScript ||
         spec.architecture == "torchscript") &&
        !options_.allow_torchscript) {
      status = absl::FailedPreconditionError(absl::StrCat(
          "'", spec.display_path,
          "' is a TorchScript archive (or was asked to load as one): a program, and loading it "
          "runs the file's code. metaloadd refuses TorchScript unless started with "
          "--allow_torchscript (only for model roots whose every file you trust)"));
      break;
    }
    absl::StatusOr<std::unique_ptr<models::Model>> built = core::CatchExceptions(
        absl::StrCat(spec.path, ": building the model"),
        [&] { return models::BuildModel(spec.architecture, (*source)->index()); });
    if (!built.ok()) {
      status = built.status();
      break;
    }
    model = *std::move(built);
    build_seconds = std::chrono::duration<double>(Clock::now() - start).count();
    // The architecture's default dtypes apply when the request names none (Stable Diffusion:
    // the web UI's policy); admission counts the bytes of the policy the load will use.
    absl::StatusOr<core::DtypePolicy> policy = models::EffectivePolicy(*model, flight->requested);
    if (!policy.ok()) {
      status = policy.status();
      break;
    }
    // What the load will allocate, known before allocating (zero-filled missing keys
    // included). TorchScript cannot say before its code ran: the file's size is admitted now,
    // and what the model really holds is counted once it is loaded (below).
    const int64_t need = ClampBytes(
        model->EstimateBytes((*source)->index(), *policy, spec.allow_missing_keys).bytes);

    // Admission: evict idle, unpinned models LRU-first until the load fits, before allocating.
    {
      std::vector<std::string> evicted;
      const int64_t available = AvailableBytes(spec.device);
      std::lock_guard<std::mutex> lock(mu_);
      status = AdmitLocked(*flight, need, available, "needs", &evicted);
      if (status.ok()) reserved = need;
      ReportEvictedLocked(spec.device, evicted);
    }
    if (!status.ok()) break;
    // The models evicted above, and any unloaded just before, are being freed: let them go
    // before this load allocates (a checkpoint switch under a budget of one model).
    releaser_->Flush();

    core::LoadOptions options;
    options.device = flight->device;
    options.policy = *policy;
    options.allow_missing_keys = spec.allow_missing_keys;
    options.zero_copy = spec.zero_copy;
    options.cancel = &flight->cancel;
    options.progress = [&broadcast](const core::LoadProgress& p) {
      broadcast({p.phase == "done" ? "place" : "read", static_cast<int64_t>(p.bytes_done),
                 static_cast<int64_t>(p.bytes_total)});
    };
    absl::StatusOr<core::LoadReport> r = core::CatchExceptions(
        spec.path, [&] { return model->Load(**source, options, spec.compute); });
    if (!r.ok()) {
      status = r.status();
      break;
    }
    report = *r;
    // Counted as the model really holds it: for TorchScript this is the first time it is known
    // (its __setstate__ may allocate what the file never held). A model over the budget is
    // refused now and freed with `model` when this flight ends.
    const int64_t holds = ClampBytes(model->ResidentBytes());
    if (holds > reserved) {
      std::vector<std::string> evicted;
      const int64_t available = AvailableBytes(spec.device);
      std::lock_guard<std::mutex> lock(mu_);
      reserved_[spec.device] -= reserved;
      reserved = 0;
      status = AdmitLocked(*flight, holds, available, "holds, measured after loading,", &evicted);
      if (status.ok()) reserved = holds;
      ReportEvictedLocked(spec.device, evicted);
    }
    if (!status.ok()) {
      releaser_->Release(std::move(model), spec.device, holds);
      break;
    }
    loaded = std::make_shared<Loaded>();
    loaded->releaser = releaser_;
    loaded->key = flight->key;
    loaded->path = spec.display_path;
    loaded->architecture = model->architecture();
    loaded->device = spec.device;
    loaded->dtype = BoundedDtype(policy->Summary());
    loaded->files = (*source)->index().files;
    loaded->parameter_count = model->ParameterCount();
    loaded->resident_bytes = holds;
    loaded->entries = model->LoadedEntries();
    loaded->pinned = spec.pin;
    loaded->loaded_at_ms = NowMs();
    loaded->last_used_ms = loaded->loaded_at_ms;
    loaded->last_use = NextUse();
    loaded->stats.total_seconds = std::chrono::duration<double>(Clock::now() - start).count();
    loaded->stats.build_seconds = build_seconds;
    loaded->stats.read_seconds = report.seconds;
    loaded->stats.bytes_read = static_cast<int64_t>(report.bytes_read);
    loaded->stats.peak_host_bytes = report.peak_host_bytes;
    loaded->stats.peak_device_bytes = report.peak_device_bytes;
    loaded->stats.unexpected_keys = report.unexpected_keys;
    loaded->model = std::move(model);
  } while (false);

  status = AsCallerSees(status, spec);
  if (status.ok() && flight->cancel.load()) {
    loaded.reset();  // everybody left while the last bytes arrived
    status = absl::CancelledError(absl::StrCat("load of '", spec.display_path, "' cancelled"));
  }

  std::vector<std::pair<std::shared_ptr<LoadWaiter>, absl::StatusOr<LoadResult>>> results;
  {
    std::lock_guard<std::mutex> lock(mu_);
    running_.erase(flight.get());
    reserved_[spec.device] -= reserved;
    // A newer flight of the same key may have taken the place of this cancelled one.
    auto mine = flights_.find(flight->key);
    if (mine != flights_.end() && mine->second == flight) flights_.erase(mine);
    if (loaded) alive_.push_back(loaded);
    for (const auto& w : flight->waiters) {
      auto it = slots_.find(w->model_id_);
      if (status.ok()) {
        if (it == slots_.end()) it = slots_.emplace(w->model_id_, std::make_unique<Slot>()).first;
        if (it->second->pending == flight || it->second->pending == nullptr) {
          it->second->pending = nullptr;
          it->second->current = loaded;  // the replaced model goes when its last user is done
        }
        results.emplace_back(
            w, LoadResult{InfoLocked(w->model_id_, *loaded, "READY"), false, loaded->stats});
      } else {
        if (it != slots_.end() && it->second->pending == flight) {
          it->second->pending = nullptr;
          if (!it->second->current) slots_.erase(it);
        }
        results.emplace_back(w, status);
      }
    }
    flight->waiters.clear();
  }
  if (options_.observer) {
    const std::string outcome = status.ok()                 ? "ok"
                                : absl::IsCancelled(status) ? "cancelled"
                                                            : "error";
    LoadStats stats = loaded ? loaded->stats : LoadStats();
    stats.total_seconds = std::chrono::duration<double>(Clock::now() - start).count();
    options_.observer->OnLoadFinished(
        spec.model_id, loaded ? loaded->architecture : spec.architecture, spec.device, outcome,
        stats, loaded ? loaded->resident_bytes : 0);
  }
  if (status.ok()) {
    core::LogInfo("model_loaded")
        .Kv("model_id", spec.model_id)
        .Kv("path", spec.display_path)
        .Kv("architecture", loaded->architecture)
        .Kv("device", spec.device)
        .Kv("seconds", loaded->stats.total_seconds)
        .Kv("bytes", loaded->resident_bytes)
        .Kv("peak_host_bytes", loaded->stats.peak_host_bytes);
    StartHash(loaded);
  } else {
    core::LogWarning("load_failed").Kv("model_id", spec.model_id).Kv("error", status.ToString());
  }
  // The flight's own reference goes before anyone hears the load is done: a caller switching
  // checkpoints loads the next one from its callback, and admission counts every model that
  // still exists, so one held here would block evicting it (seen in CI as RESOURCE_EXHAUSTED).
  loaded.reset();
  for (auto& [w, result] : results) w->Finish(std::move(result));
}

void ModelCache::StartHash(const std::shared_ptr<Loaded>& loaded) {
  if (options_.checksums == nullptr) return;
  std::weak_ptr<Loaded> weak = loaded;
  std::vector<core::CheckpointFile> files = loaded->files;
  core::ChecksumStore* store = options_.checksums;
  const std::atomic<bool>* stopping = &stopping_;  // outlives hash_pool_, which runs this
  hash_pool_->Submit([weak, files, store, stopping] {
    if (weak.expired()) return;
    std::optional<std::string> sha = store->Lookup(files);
    if (!sha) {
      absl::StatusOr<std::string> computed = store->Compute(files, stopping);
      if (!computed.ok()) {
        if (!absl::IsCancelled(computed.status())) {
          core::LogWarning("hash_failed").Kv("error", computed.status().ToString());
        }
        return;
      }
      sha = *computed;
    }
    if (std::shared_ptr<Loaded> l = weak.lock()) {
      std::lock_guard<std::mutex> lock(l->hash_mu);
      l->sha256 = *sha;
    }
  });
}

ModelInfo ModelCache::InfoLocked(const std::string& id, const Loaded& l,
                                 const std::string& state) const {
  ModelInfo info;
  info.model_id = id;
  info.path = l.path;
  info.architecture = l.architecture;
  info.device = l.device;
  info.dtype = l.dtype;
  info.state = state;
  info.parameter_count = l.parameter_count;
  info.resident_bytes = l.resident_bytes;
  {
    std::lock_guard<std::mutex> lock(const_cast<Loaded&>(l).hash_mu);
    info.sha256 = l.sha256;
  }
  info.short_hash = info.sha256.substr(0, std::min<size_t>(10, info.sha256.size()));
  info.entries = l.entries;
  info.loaded_at_unix_ms = l.loaded_at_ms;
  info.last_used_unix_ms = l.last_used_ms.load();
  info.infer_count = l.infer_count.load();
  return info;
}

absl::StatusOr<ModelInfo> ModelCache::Get(const std::string& model_id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = slots_.find(model_id);
  if (it == slots_.end()) {
    return absl::NotFoundError(absl::StrCat("model_id '", model_id, "' is not loaded"));
  }
  if (it->second->current) return InfoLocked(model_id, *it->second->current, "READY");
  ModelInfo info;
  info.model_id = model_id;
  info.path = it->second->pending->spec.display_path;
  info.architecture = it->second->pending->spec.architecture;
  info.device = it->second->pending->spec.device;
  // Until the model is built, an empty request's dtypes are the architecture's, not yet known.
  const std::optional<core::DtypePolicy>& requested = it->second->pending->requested;
  info.dtype = requested ? BoundedDtype(requested->Summary()) : "default";
  info.state = "LOADING";
  return info;
}

std::vector<ModelInfo> ModelCache::List() const {
  std::vector<std::string> ids;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [id, slot] : slots_) ids.push_back(id);
  }
  std::vector<ModelInfo> out;
  for (const std::string& id : ids) {
    absl::StatusOr<ModelInfo> info = Get(id);
    if (info.ok()) out.push_back(*std::move(info));
  }
  return out;
}

absl::StatusOr<ModelInfo> ModelCache::Unload(const std::string& model_id) {
  std::vector<std::shared_ptr<LoadWaiter>> cancelled;
  ModelInfo info;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = slots_.find(model_id);
    if (it == slots_.end()) {
      return absl::NotFoundError(absl::StrCat("model_id '", model_id, "' is not loaded"));
    }
    Slot& slot = *it->second;
    if (slot.current) {
      info = InfoLocked(model_id, *slot.current, "UNLOADING");
    } else {
      info.model_id = model_id;
      info.path = slot.pending->spec.display_path;
      info.state = "UNLOADING";
    }
    if (slot.pending) {
      auto& ws = slot.pending->waiters;
      for (auto w = ws.begin(); w != ws.end();) {
        if ((*w)->model_id_ == model_id) {
          cancelled.push_back(*w);
          w = ws.erase(w);
        } else {
          ++w;
        }
      }
      if (ws.empty()) slot.pending->cancel.store(true);
    }
    slots_.erase(it);  // the model goes with its last handle
  }
  for (const auto& w : cancelled) {
    w->Finish(
        absl::CancelledError(absl::StrCat("model_id '", model_id, "' was unloaded while loading")));
  }
  if (options_.observer) options_.observer->OnModelRemoved(model_id);
  core::LogInfo("model_unloaded").Kv("model_id", model_id);
  return info;
}

void ModelCache::Infer(const std::string& model_id, const std::string& entry,
                       std::vector<WireTensor> inputs, bool typed_outputs, InferDoneFn done) {
  std::shared_ptr<InUse> held;  // shared: the pool's std::function must be copyable
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = slots_.find(model_id);
    if (it != slots_.end() && it->second->current) {
      held = std::make_shared<InUse>(it->second->current);
    }
  }
  if (!held) {
    done(absl::NotFoundError(
        absl::StrCat("model_id '", model_id, "' is not loaded (or still loading)")));
    return;
  }
  // Refused before it is queued, let alone computed: entries are immutable once loaded.
  if (absl::Status affordable =
          CheckInferAffordable(held->get()->entries, entry, inputs, options_.infer_limits);
      !affordable.ok()) {
    held->Release();
    done(absl::Status(affordable.code(),
                      absl::StrCat("model_id '", model_id, "': ", affordable.message())));
    return;
  }
  infer_pool_->Submit([this, held, entry, inputs = std::move(inputs), typed_outputs,
                       done = std::move(done), model_id]() mutable {
    const std::shared_ptr<Loaded> loaded = held->get();
    const auto start = Clock::now();
    infers_running_.fetch_add(1);
    struct Running {
      std::atomic<int>& count;
      ~Running() { count.fetch_sub(1); }
    } running{infers_running_};
    absl::StatusOr<std::vector<WireTensor>> result = core::CatchExceptions(
        absl::StrCat("model_id '", model_id, "'"),
        [&]() -> absl::StatusOr<std::vector<WireTensor>> {
          std::map<std::string, at::Tensor> feed;
          for (const WireTensor& w : inputs) {
            absl::StatusOr<at::Tensor> t = DecodeTensor(w);
            if (!t.ok()) return t.status();
            if (!feed.emplace(w.name, *t).second) {
              return absl::InvalidArgumentError(absl::StrCat("input '", w.name, "' given twice"));
            }
          }
          inputs.clear();
          absl::StatusOr<models::NamedTensors> out = loaded->model->Run(entry, feed);
          if (!out.ok()) return out.status();
          std::vector<WireTensor> wire;
          for (const auto& [name, tensor] : *out) {
            absl::StatusOr<WireTensor> encoded = EncodeTensor(name, tensor, typed_outputs);
            if (!encoded.ok()) return encoded.status();
            wire.push_back(*std::move(encoded));
          }
          return wire;
        });
    loaded->infer_count.fetch_add(1);
    loaded->last_used_ms = NowMs();
    loaded->last_use = NextUse();
    if (options_.observer && result.ok()) {
      // Only while the id still holds this model: an Infer that outlives an Unload must not
      // bring back the per-model series OnModelRemoved dropped.
      std::lock_guard<std::mutex> lock(mu_);
      auto it = slots_.find(model_id);
      if (it != slots_.end() && it->second->current == loaded) {
        options_.observer->OnInfer(model_id,
                                   std::chrono::duration<double>(Clock::now() - start).count());
      }
    }
    held->Release();
    done(std::move(result));
  });
}

std::map<std::string, int64_t> ModelCache::ResidentBytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::map<std::string, int64_t> out;
  for (const std::weak_ptr<Loaded>& weak : alive_) {
    if (std::shared_ptr<Loaded> l = weak.lock()) out[l->device] += l->resident_bytes;
  }
  return out;
}

int64_t ModelCache::DefaultAvailableBytes(const std::string& device) {
  if (device != "cpu") return -1;
  const int64_t available = core::MemAvailableBytes();
  return available > 0 ? available : -1;
}

ModelCache::LoadActivity ModelCache::Activity() const {
  LoadActivity out;
  out.threads = options_.load_threads;
  out.infers_running = infers_running_.load();
  const auto now = Clock::now();
  std::lock_guard<std::mutex> lock(mu_);
  out.queued = queued_;
  for (const auto& [flight, started] : running_) {
    out.running.push_back(
        {flight->waiters.empty() ? flight->spec.model_id : flight->waiters.front()->model_id_,
         flight->spec.display_path, std::chrono::duration<double>(now - started).count()});
  }
  std::sort(out.running.begin(), out.running.end(),
            [](const RunningLoad& a, const RunningLoad& b) { return a.seconds > b.seconds; });
  return out;
}

}  // namespace metaload::cache
