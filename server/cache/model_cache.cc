#include "server/cache/model_cache.h"

#include <ATen/ATen.h>
#include <sys/stat.h>

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "server/cache/flight.h"
#include "server/cache/infer_call.h"
#include "server/cache/load_key.h"
#include "server/cache/loaded_model.h"
#include "server/core/byte_size.h"
#include "server/core/checksum_store.h"
#include "server/core/dtype_policy.h"
#include "server/core/host_arena.h"
#include "server/core/loader.h"
#include "server/core/log.h"
#include "server/core/thread_pool.h"
#include "server/core/torch_runtime.h"
#include "server/core/torch_types.h"
#include "server/models/model.h"

namespace metaload::cache {

using Clock = std::chrono::steady_clock;

namespace {

// `resolved` replaced by `shown` everywhere in `message`.
void ReplacePath(const std::string& resolved, const std::string& shown, std::string* message) {
  if (resolved.empty() || resolved == shown) return;
  for (size_t at = message->find(resolved); at != std::string::npos;
       at = message->find(resolved, at + shown.size())) {
    message->replace(at, resolved.size(), shown);
  }
}

}  // namespace

absl::Status AsCallerSees(const absl::Status& status, const LoadSpec& spec) {
  if (status.ok()) return status;
  std::string message(status.message());
  // The longer first: one of the two may lie under the other's directory.
  if (spec.vae_path.size() > spec.path.size()) {
    ReplacePath(spec.vae_path, spec.vae_display_path, &message);
    ReplacePath(spec.path, spec.display_path, &message);
  } else {
    ReplacePath(spec.path, spec.display_path, &message);
    ReplacePath(spec.vae_path, spec.vae_display_path, &message);
  }
  return absl::Status(status.code(), message);
}

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
    core::MutexLock lock(&mu_);
    for (auto& [key, flight] : flights_) flight->cancel.store(true);
  }
  load_pool_.reset();
  infer_pool_.reset();
  hash_pool_.reset();
}

bool LoadWaiter::Cancel() {
  {
    core::MutexLock lock(&callback_mu_);
    if (finished_) return false;
    cancelled_ = true;
  }
  return cache_->CancelWaiter(this);
}

void LoadWaiter::Deliver(const LoadProgressEvent& event) {
  core::MutexLock lock(&callback_mu_);
  if (!cancelled_ && !finished_ && progress_) progress_(event);
}

void LoadWaiter::Finish(absl::StatusOr<LoadResult> result) {
  core::MutexLock lock(&callback_mu_);
  if (cancelled_ || finished_) return;
  finished_ = true;
  done_(std::move(result));
}

bool ModelCache::CancelWaiter(LoadWaiter* waiter) {
  core::MutexLock lock(&mu_);
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
      it->second->draining = false;
      if (it->second->current == nullptr) slots_.erase(it);
    }
  }
  // The load stops only when nobody wants it any more.
  if (ws.empty()) flight->cancel.store(true);
  return true;
}

std::shared_ptr<LoadWaiter> ModelCache::Load(const LoadSpec& spec, ProgressFn progress,
                                             DoneFn done) {
  auto waiter = std::shared_ptr<LoadWaiter>(new LoadWaiter());
  waiter->cache_ = this;
  waiter->model_id_ = spec.model_id;
  waiter->progress_ = std::move(progress);
  waiter->done_ = std::move(done);

  // The request, parsed once: the flight carries the typed values to the loader.
  absl::StatusOr<std::optional<core::DtypePolicy>> requested =
      core::DtypePolicy::FromRequest(spec.dtype, spec.dtype_overrides);
  absl::StatusOr<c10::Device> device = core::ParseDevice(spec.device);
  absl::Status early = requested.status();
  if (early.ok()) early = device.status();
  if (early.ok()) {
    core::LoadOptions as_loaded;  // what the loader will refuse, refused before admission
    as_loaded.device = *device;
    as_loaded.zero_copy = spec.zero_copy;
    early = core::CheckLoadOptions(as_loaded);
  }
  struct stat st;
  if (early.ok() && ::stat(spec.path.c_str(), &st) != 0) {
    early = absl::NotFoundError(absl::StrCat("path '", spec.display_path, "' does not exist"));
  }
  struct stat vae_st;
  if (early.ok() && !spec.vae_path.empty() && ::stat(spec.vae_path.c_str(), &vae_st) != 0) {
    early =
        absl::NotFoundError(absl::StrCat("vae_path '", spec.vae_display_path, "' does not exist"));
  }
  if (!early.ok()) {
    waiter->Finish(early);
    return waiter;
  }
  LoadSpec canonical = spec;
  canonical.device = device->str();
  const std::string key = LoadKey(spec, canonical.device, *requested, st);

  core::MutexLock lock(&mu_);
  std::unique_ptr<Slot>& slot = slots_[spec.model_id];
  if (!slot) slot = std::make_unique<Slot>();
  if (slot->current && slot->current->key == key && !slot->pending) {
    std::shared_ptr<Loaded> loaded = slot->current;
    loaded->last_used_ms = NowMs();
    loaded->last_use = NextUse();
    LoadResult result{InfoLocked(spec.model_id, *loaded, "READY"), true, loaded->stats};
    lock.Unlock();
    if (options_.observer) options_.observer->OnCacheRequest("hit");
    waiter->Finish(std::move(result));
    return waiter;
  }
  // A flight whose callers all left is being torn down: a newcomer never joins it (it would get
  // their CANCELLED), it starts a load of its own below.
  if (slot->pending && slot->pending->key == key && !slot->pending->cancel.load()) {
    slot->pending->waiters.push_back(waiter);
    waiter->flight_ = slot->pending;
    lock.Unlock();
    if (options_.observer) options_.observer->OnCacheRequest("coalesced");
    return waiter;
  }
  if (slot->pending && !slot->pending->cancel.load()) {
    // Copied under the lock: once it is released, Unload may erase the slot.
    const std::string other = slot->pending->spec.display_path;
    lock.Unlock();
    waiter->Finish(
        absl::AlreadyExistsError(absl::StrCat("model_id '", spec.model_id, "' is already loading '",
                                              other, "'; wait for it or unload it first")));
    return waiter;
  }
  if (slot->current && !spec.replace) {
    const std::string other = slot->current->path;
    lock.Unlock();
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
      lock.Unlock();
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
    slot->draining = false;
    lock.Unlock();
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
  slot->draining = false;
  ++queued_;
  lock.Unlock();
  if (options_.observer) options_.observer->OnCacheRequest("miss");
  waiter->Deliver({"queued", 0, 0});
  load_pool_->Submit([this, flight] { RunLoad(flight); });
  return waiter;
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
  info.sha256 = l.Sha256();
  info.short_hash = info.sha256.substr(0, std::min<size_t>(10, info.sha256.size()));
  info.entries = l.entries;
  info.diffusion = l.diffusion;
  info.vae_path = l.vae_path;
  info.loaded_at_unix_ms = l.loaded_at_ms;
  info.last_used_unix_ms = l.last_used_ms.load();
  info.infer_count = l.infer_count.load();
  return info;
}

absl::StatusOr<ModelInfo> ModelCache::Get(const std::string& model_id) const {
  core::MutexLock lock(&mu_);
  auto it = slots_.find(model_id);
  if (it == slots_.end()) {
    return absl::NotFoundError(absl::StrCat("model_id '", model_id, "' is not loaded"));
  }
  if (it->second->current) return InfoLocked(model_id, *it->second->current, "READY");
  const Flight& pending = *it->second->pending;
  ModelInfo info;
  info.model_id = model_id;
  info.path = pending.spec.display_path;
  info.architecture = pending.spec.architecture;
  info.device = pending.spec.device;
  // Until the model is built, an empty request's dtypes are the architecture's, not yet known.
  info.dtype = pending.requested ? BoundedDtype(pending.requested->Summary()) : "default";
  info.state = "LOADING";
  return info;
}

std::vector<ModelInfo> ModelCache::List() const {
  std::vector<std::string> ids;
  {
    core::MutexLock lock(&mu_);
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
  std::unique_ptr<Slot> gone;  // released after the lock: the model goes with its last handle
  ModelInfo info;
  {
    core::MutexLock lock(&mu_);
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
      slot.pending->unloaded.insert(model_id);
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
    gone = std::move(it->second);
    slots_.erase(it);
  }
  gone.reset();
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
    core::MutexLock lock(&mu_);
    auto it = slots_.find(model_id);
    if (it != slots_.end() && it->second->current && !it->second->draining) {
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
    std::shared_ptr<Loaded> loaded = held->get();
    const auto start = Clock::now();
    infers_running_.fetch_add(1);
    struct Running {
      std::atomic<int>& count;
      ~Running() { count.fetch_sub(1); }
    } running{infers_running_};
    absl::StatusOr<std::vector<WireTensor>> result =
        RunInfer(*loaded->model, entry, std::move(inputs), typed_outputs,
                 absl::StrCat("model_id '", model_id, "'"));
    loaded->infer_count.fetch_add(1);
    loaded->last_used_ms = NowMs();
    loaded->last_use = NextUse();
    if (options_.observer && result.ok()) {
      // Only while the id still holds this model: an Infer that outlives an Unload must not
      // bring back the per-model series OnModelRemoved dropped.
      core::MutexLock lock(&mu_);
      auto it = slots_.find(model_id);
      if (it != slots_.end() && it->second->current == loaded) {
        options_.observer->OnInfer(model_id,
                                   std::chrono::duration<double>(Clock::now() - start).count());
      }
    }
    // Every reference goes before the callback: a caller that loads from it, or right after
    // it returns, must find an unloaded model's bytes freed.
    loaded.reset();
    held->Release();
    done(std::move(result));
  });
}

int64_t ModelCache::HeldBytesLocked(const std::string& device) const {
  int64_t held = 0;
  for (const std::weak_ptr<Loaded>& weak : alive_) {
    std::shared_ptr<Loaded> loaded = weak.lock();
    if (loaded && loaded->device == device) held += loaded->resident_bytes;
  }
  return held;
}

std::map<std::string, int64_t> ModelCache::ResidentBytes() const {
  core::MutexLock lock(&mu_);
  std::map<std::string, int64_t> out;
  for (const std::weak_ptr<Loaded>& weak : alive_) {
    if (std::shared_ptr<Loaded> l = weak.lock()) out[l->device] += l->resident_bytes;
  }
  return out;
}

std::optional<ModelCache::ArenaFigures> ModelCache::Arena() const {
  if (options_.host_arena == nullptr) return std::nullopt;
  const core::HostArena::Stats s = options_.host_arena->stats();
  return ArenaFigures{ClampBytes(s.kept_bytes), ClampBytes(s.reused_bytes_total)};
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
  core::MutexLock lock(&mu_);
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
