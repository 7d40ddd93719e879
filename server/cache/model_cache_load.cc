// ModelCache's load path: a flight's five steps (model_cache.h says what each does) and the
// background hash that follows a load.
#include <ATen/ATen.h>

#include <chrono>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "server/cache/admission.h"
#include "server/cache/flight.h"
#include "server/cache/load_key.h"
#include "server/cache/loaded_model.h"
#include "server/cache/model_cache.h"
#include "server/core/byte_size.h"
#include "server/core/checkpoint.h"
#include "server/core/checksum_store.h"
#include "server/core/exception_boundary.h"
#include "server/core/host_arena.h"
#include "server/core/loader.h"
#include "server/core/log.h"
#include "server/core/thread_pool.h"
#include "server/models/ldm_layout.h"
#include "server/models/registry.h"

namespace metaload::cache {

using Clock = std::chrono::steady_clock;

namespace {

// Byte figures are admitted as int64; a saturated estimate (a config claiming 2^70 elements)
// must stay far from overflowing `used + need`.
constexpr int64_t kMaxAdmittedBytes = INT64_MAX / 4;

double SecondsSince(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// A build or load error about the VAE's keys, when they came from a VAE file: the file is named,
// since the message names the checkpoint.
absl::Status NameTheVae(const LoadSpec& spec, absl::Status status) {
  if (spec.vae_path.empty() || status.message().find(models::kLdmVae) == absl::string_view::npos) {
    return status;
  }
  return absl::Status(status.code(),
                      absl::StrCat(status.message(), " (", models::kLdmVae,
                                   " comes from the VAE file '", spec.vae_display_path, "')"));
}

}  // namespace

struct ModelCache::Prepared {
  std::unique_ptr<core::CheckpointSource> source;
  std::unique_ptr<models::Model> model;
  core::DtypePolicy policy;  // effective: the architecture's default applied
  int64_t need = 0;          // the model's estimate, clamped
  double build_seconds = 0;
  Clock::time_point start;
  std::function<void(const LoadProgressEvent&)> broadcast;
};

struct ModelCache::Delivery {
  std::shared_ptr<LoadWaiter> waiter;
  absl::StatusOr<LoadResult> result;
};

int64_t ModelCache::ClampBytes(uint64_t bytes) {
  return static_cast<int64_t>(std::min<uint64_t>(bytes, kMaxAdmittedBytes));
}

int64_t ModelCache::AvailableBytes(const std::string& device) {
  if (!options_.budget_follows_available.count(device)) return -1;
  // Frees queued before now count as free: let them finish first (a checkpoint switch).
  releaser_->Flush();
  int64_t available = options_.available_bytes ? options_.available_bytes(device) : -1;
  // Kept arena memory is resident but no model's: free for this purpose.
  if (available >= 0 && device == "cpu" && options_.host_arena != nullptr) {
    available += ClampBytes(options_.host_arena->KeptResidentBytes());
  }
  return available;
}

void ModelCache::RunLoad(std::shared_ptr<Flight> flight) {
  const auto start = Clock::now();
  {
    core::MutexLock lock(&mu_);
    --queued_;
    running_[flight.get()] = start;
  }
  std::shared_ptr<Loaded> loaded;
  absl::StatusOr<Prepared> prepared = Prepare(*flight);
  absl::Status status = prepared.status();
  if (status.ok()) {
    prepared->start = start;
    std::vector<std::shared_ptr<Loaded>> victims;
    Approval approval;
    // A replace under a budget of one whose predecessor is running an Infer waits for it.
    for (;;) {
      approval = Approval();
      approval.may_wait = true;
      const int64_t available = AvailableBytes(flight->spec.device);
      core::MutexLock lock(&mu_);
      // Under mu_, where callers leave: a flight nobody wants evicts nothing.
      if (flight->cancel.load()) {
        status = absl::CancelledError(
            absl::StrCat("load of '", flight->spec.display_path, "' cancelled"));
        break;
      }
      status = ApproveLocked(*flight, prepared->need, available, "needs", &victims, &approval);
      if (!approval.waits_for_replaced || flight->cancel.load() || stopping_.load()) break;
      lock.Unlock();
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    {
      core::MutexLock lock(&mu_);
      for (auto& [id, slot] : slots_) {
        if (slot->pending.get() == flight.get()) slot->draining = false;
      }
    }
    const int64_t arena_room = approval.arena_room;
    // Kept memory beyond what the budget leaves goes back to the kernel before this load
    // allocates; the evicted models' memory then joins what is kept (it was counted as theirs).
    // A load that fills from the arena may find its need there (a take of fresh memory gives
    // back as much kept memory first); one that does not (zero_copy views, TorchScript) needs
    // its room beside what is kept.
    if (status.ok() && arena_room >= 0 && flight->spec.device == "cpu" &&
        options_.host_arena != nullptr) {
      const bool fills_from_arena =
          !flight->spec.zero_copy && prepared->model->architecture() != "torchscript";
      const int64_t keep = fills_from_arena ? arena_room : arena_room - prepared->need;
      options_.host_arena->TrimTo(static_cast<uint64_t>(std::max<int64_t>(0, keep)));
    }
    victims.clear();  // unlocked: the evicted models are queued for freeing here
    if (status.ok()) {
      // The models evicted above, and any unloaded just before, are being freed: let them go
      // before this load allocates (a checkpoint switch under a budget of one model).
      releaser_->Flush();
      absl::StatusOr<std::shared_ptr<Loaded>> executed = Execute(*flight, *std::move(prepared));
      status = executed.status();
      if (executed.ok()) loaded = *std::move(executed);
    }
  }
  status = AsCallerSees(status, flight->spec);
  if (status.ok() && flight->cancel.load()) {
    loaded.reset();  // everybody left while the last bytes arrived
    status =
        absl::CancelledError(absl::StrCat("load of '", flight->spec.display_path, "' cancelled"));
  }
  std::vector<Delivery> deliveries;
  std::vector<std::pair<std::string, LoadSpec>> restore;
  {
    core::MutexLock lock(&mu_);
    deliveries = PublishLocked(*flight, status, loaded);
    if (!status.ok() && !stopping_.load()) {
      for (auto& [id, old] : flight->restore) {
        if (!flight->unloaded.count(id) && !slots_.count(id)) restore.emplace_back(id, old);
      }
    }
  }
  // A replace that evicted its predecessor and then failed: the predecessor comes back before
  // the caller hears of the failure, so a Get right after shows it loading.
  for (auto& [id, old] : restore) {
    core::LogWarning("replace_failed_restoring").Kv("model_id", id).Kv("path", old.display_path);
    old.model_id = id;
    old.replace = false;
    Load(old, nullptr, [model_id = old.model_id](absl::StatusOr<LoadResult> r) {
      if (!r.ok()) {
        core::LogWarning("restore_failed")
            .Kv("model_id", model_id)
            .Kv("error", r.status().ToString());
      }
    });
  }
  Notify(*flight, status, std::move(loaded), std::move(deliveries), SecondsSince(start));
}

absl::StatusOr<ModelCache::Prepared> ModelCache::Prepare(const Flight& flight) {
  const LoadSpec& spec = flight.spec;
  const auto start = Clock::now();
  Prepared p;
  p.broadcast = [this, &flight](const LoadProgressEvent& e) {
    std::vector<std::shared_ptr<LoadWaiter>> waiters;
    {
      core::MutexLock lock(&mu_);
      waiters = flight.waiters;
    }
    for (const auto& w : waiters) w->Deliver(e);
  };
  if (flight.cancel.load()) {
    return absl::CancelledError(absl::StrCat("load of '", spec.display_path, "' cancelled"));
  }
  p.broadcast({"build", 0, 0});
  core::CheckpointSource::Options source_options;
  source_options.roots = options_.model_roots;
  if (!spec.vae_path.empty()) {
    source_options.overlay_path = spec.vae_path;
    source_options.overlay_prefix = models::kLdmVae;
  }
  absl::StatusOr<std::unique_ptr<core::CheckpointSource>> source = core::CatchExceptions(
      spec.path, [&] { return core::CheckpointSource::Open(spec.path, source_options); });
  if (!source.ok()) return source.status();
  p.source = *std::move(source);
  const core::CheckpointIndex& index = p.source->index();
  // A TorchScript archive is a program: loading it runs its code (__setstate__, and forward on
  // every Infer). Only an operator who trusts every model root may allow it.
  if ((index.format == core::CheckpointFormat::kTorchScript ||
       spec.architecture == "torchscript") &&
      !options_.allow_torchscript) {
    return absl::FailedPreconditionError(absl::StrCat(
        "'", spec.display_path,
        "' is a TorchScript archive (or was asked to load as one): a program, and loading it "
        "runs the file's code. metaloadd refuses TorchScript unless started with "
        "--allow_torchscript (only for model roots whose every file you trust)"));
  }
  absl::StatusOr<std::unique_ptr<models::Model>> model =
      core::CatchExceptions(absl::StrCat(spec.path, ": building the model"), [&] {
        return options_.build_model ? options_.build_model(spec.architecture, index)
                                    : models::BuildModel(spec.architecture, index);
      });
  if (!model.ok()) return NameTheVae(spec, model.status());
  p.model = *std::move(model);
  p.build_seconds = SecondsSince(start);
  if (!spec.vae_path.empty() && !p.model->Diffusion()) {
    return absl::FailedPreconditionError(
        absl::StrCat("vae_path applies to Stable Diffusion models; '", spec.display_path, "' is ",
                     p.model->architecture()));
  }
  if (!spec.prediction.empty() && !p.model->Diffusion()) {
    return absl::FailedPreconditionError(
        absl::StrCat("prediction '", spec.prediction, "' applies to diffusion models; '",
                     spec.display_path, "' is ", p.model->architecture()));
  }
  absl::StatusOr<core::DtypePolicy> policy = models::EffectivePolicy(*p.model, flight.requested);
  if (!policy.ok()) return policy.status();
  p.policy = *std::move(policy);
  // What the load will allocate, known before allocating (zero-filled missing keys included;
  // TorchScript's first guess is checked again once loaded, in Execute).
  p.need = ClampBytes(p.model->EstimateBytes(index, p.policy, spec.allow_missing_keys).bytes);
  return p;
}

absl::Status ModelCache::ApproveLocked(Flight& flight, int64_t need, int64_t available,
                                       const char* verb,
                                       std::vector<std::shared_ptr<Loaded>>* victims,
                                       Approval* approval) {
  const LoadSpec& spec = flight.spec;
  AdmissionRequest request;
  request.need = need;
  auto budget = options_.budgets.find(spec.device);
  if (budget != options_.budgets.end()) request.budget = budget->second;
  request.available = available;
  request.held = HeldBytesLocked(spec.device);
  request.reserved = reserved_[spec.device];
  // Each distinct model in a slot on the device, once, with the ids that name it.
  std::vector<const Loaded*> models;
  std::set<std::string> wanted;  // the ids this load will fill
  for (const auto& w : flight.waiters) wanted.insert(w->model_id_);
  for (const auto& [id, slot] : slots_) {
    const Loaded* l = slot->current.get();
    if (!l || l->device != spec.device) continue;
    auto at = std::find(models.begin(), models.end(), l);
    if (at == models.end()) {
      models.push_back(l);
      request.residents.push_back(
          {l->resident_bytes, l->last_use.load(), l->pinned, l->active.load() > 0, false});
      at = models.end() - 1;
    }
    if (wanted.count(id)) request.residents[at - models.begin()].replaced = true;
  }
  const Admission admission = Admit(request);
  if (!admission.admitted && approval != nullptr && approval->may_wait) {
    // Would it fit once the replaced models' Infers end?
    AdmissionRequest idle = request;
    bool busy = false;
    for (Resident& r : idle.residents) {
      busy |= r.replaced && r.in_use;
      if (r.replaced) r.in_use = false;
    }
    if (busy && Admit(idle).admitted) {
      approval->waits_for_replaced = true;
      for (const auto& [id, slot] : slots_) {
        if (wanted.count(id) && slot->current && slot->current->active.load() > 0) {
          slot->draining = true;
        }
      }
      return absl::UnavailableError("waiting for the Infers on the replaced model");
    }
  }
  if (!admission.admitted) {
    const int64_t limit = admission.limit;
    return absl::ResourceExhaustedError(absl::StrCat(
        "'", spec.display_path, "' ", verb, " ", core::HumanBytes(need), " on ", spec.device,
        "; the budget is ", core::HumanBytes(limit),
        request.budget && limit < *request.budget
            ? absl::StrCat(" (", core::HumanBytes(*request.budget),
                           " capped by what the models hold plus 80% of the ",
                           core::HumanBytes(available), " free now)")
            : "",
        " and ", core::HumanBytes(admission.used), " is held by models in use or pinned"));
  }
  std::vector<std::string> evicted;
  for (size_t i : admission.evict) {
    for (auto it = slots_.begin(); it != slots_.end();) {
      if (it->second->current.get() == models[i]) {
        evicted.push_back(it->first);
        if (wanted.count(it->first)) flight.restore.push_back({it->first, models[i]->spec});
        victims->push_back(std::move(it->second->current));
        if (!it->second->pending) {
          it = slots_.erase(it);
          continue;
        }
      }
      ++it;
    }
    if (options_.observer) options_.observer->OnEviction(spec.device);
  }
  for (const std::string& id : evicted) {
    core::LogInfo("model_evicted").Kv("model_id", id).Kv("device", spec.device);
    if (options_.observer) options_.observer->OnModelRemoved(id);
  }
  if (approval != nullptr && request.budget) {
    approval->arena_room = std::max<int64_t>(0, admission.limit - request.held - request.reserved);
  }
  // The victims stay in alive_ (counted) until the caller drops them, after the lock: only
  // then are they queued for freeing.
  reserved_[spec.device] += need;
  flight.reserved += need;
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<Loaded>> ModelCache::Execute(Flight& flight, Prepared prepared) {
  const LoadSpec& spec = flight.spec;
  core::LoadOptions options;
  options.device = flight.device;
  options.policy = prepared.policy;
  options.allow_missing_keys = spec.allow_missing_keys;
  options.zero_copy = spec.zero_copy;
  if (spec.device == "cpu") options.host_arena = options_.host_arena;
  options.cancel = &flight.cancel;
  options.progress = [&prepared](const core::LoadProgress& p) {
    prepared.broadcast({p.phase == "done" ? "place" : "read", static_cast<int64_t>(p.bytes_done),
                        static_cast<int64_t>(p.bytes_total)});
  };
  std::unique_ptr<models::Model>& model = prepared.model;
  absl::StatusOr<core::LoadReport> report = core::CatchExceptions(
      spec.path, [&] { return model->Load(*prepared.source, options, spec.compute); });
  if (!report.ok()) return NameTheVae(spec, report.status());
  // Counted as the model really holds it: for TorchScript this is the first time it is known
  // (its __setstate__ may allocate what the file never held). A model over the budget is
  // refused now and freed on the release thread.
  const int64_t holds = ClampBytes(model->ResidentBytes());
  if (holds > prepared.need) {
    absl::Status approved;
    std::vector<std::shared_ptr<Loaded>> victims;
    Approval approval;
    {
      const int64_t available = AvailableBytes(spec.device);
      core::MutexLock lock(&mu_);
      reserved_[spec.device] -= flight.reserved;
      flight.reserved = 0;
      approved = ApproveLocked(flight, holds, available, "holds, measured after loading,", &victims,
                               &approval);
    }
    // What it holds came from no arena: the arena keeps at most what the budget leaves beside.
    if (approved.ok() && approval.arena_room >= 0 && spec.device == "cpu" &&
        options_.host_arena != nullptr) {
      options_.host_arena->TrimTo(
          static_cast<uint64_t>(std::max<int64_t>(0, approval.arena_room - holds)));
    }
    victims.clear();
    if (!approved.ok()) {
      releaser_->Release(std::move(model), spec.device, holds);
      return approved;
    }
  }
  auto loaded = std::make_shared<Loaded>();
  loaded->releaser = releaser_;
  loaded->key = flight.key;
  loaded->spec = spec;
  loaded->path = spec.display_path;
  loaded->architecture = model->architecture();
  loaded->device = spec.device;
  loaded->dtype = BoundedDtype(prepared.policy.Summary());
  // The checkpoint's own files: its hash is the web UI's, whatever VAE it is loaded with.
  const core::CheckpointIndex& index = prepared.source->index();
  loaded->files.assign(index.files.begin(), index.files.end() - index.overlay_files);
  loaded->parameter_count = model->ParameterCount();
  loaded->resident_bytes = holds;
  loaded->entries = model->LoadedEntries();
  loaded->diffusion = model->Diffusion();
  loaded->vae_path = spec.vae_display_path;
  if (loaded->diffusion && !spec.prediction.empty()) {
    loaded->diffusion->prediction = spec.prediction;
    loaded->diffusion->prediction_source = "request";
  }
  loaded->pinned = spec.pin;
  loaded->loaded_at_ms = NowMs();
  loaded->last_used_ms = loaded->loaded_at_ms;
  loaded->last_use = NextUse();
  loaded->stats.total_seconds = SecondsSince(prepared.start);
  loaded->stats.build_seconds = prepared.build_seconds;
  loaded->stats.read_seconds = report->seconds;
  loaded->stats.bytes_read = static_cast<int64_t>(report->bytes_read);
  loaded->stats.peak_host_bytes = report->peak_host_bytes;
  loaded->stats.peak_device_bytes = report->peak_device_bytes;
  loaded->stats.arena_reused_bytes = ClampBytes(report->arena_reused_bytes);
  loaded->stats.unexpected_keys = report->unexpected_keys;
  loaded->model = std::move(model);
  return loaded;
}

std::vector<ModelCache::Delivery> ModelCache::PublishLocked(Flight& flight,
                                                            const absl::Status& status,
                                                            const std::shared_ptr<Loaded>& loaded) {
  running_.erase(&flight);
  reserved_[flight.spec.device] -= flight.reserved;
  flight.reserved = 0;
  // A newer flight of the same key may have taken the place of this cancelled one.
  auto mine = flights_.find(flight.key);
  if (mine != flights_.end() && mine->second.get() == &flight) flights_.erase(mine);
  alive_.erase(std::remove_if(alive_.begin(), alive_.end(),
                              [](const std::weak_ptr<Loaded>& w) { return w.expired(); }),
               alive_.end());
  if (loaded) alive_.push_back(loaded);
  std::vector<Delivery> out;
  for (const auto& w : flight.waiters) {
    auto it = slots_.find(w->model_id_);
    if (status.ok()) {
      if (it == slots_.end()) it = slots_.emplace(w->model_id_, std::make_unique<Slot>()).first;
      if (it->second->pending.get() == &flight || it->second->pending == nullptr) {
        it->second->pending = nullptr;
        it->second->draining = false;
        it->second->current = loaded;  // the replaced model goes when its last user is done
      }
      out.push_back(
          {w, LoadResult{InfoLocked(w->model_id_, *loaded, "READY"), false, loaded->stats}});
    } else {
      if (it != slots_.end() && it->second->pending.get() == &flight) {
        it->second->pending = nullptr;
        it->second->draining = false;
        if (!it->second->current) slots_.erase(it);
      }
      out.push_back({w, status});
    }
  }
  flight.waiters.clear();
  return out;
}

void ModelCache::Notify(const Flight& flight, const absl::Status& status,
                        std::shared_ptr<Loaded> loaded, std::vector<Delivery> deliveries,
                        double seconds) {
  const LoadSpec& spec = flight.spec;
  if (options_.observer) {
    const std::string outcome = status.ok()                 ? "ok"
                                : absl::IsCancelled(status) ? "cancelled"
                                                            : "error";
    LoadStats stats = loaded ? loaded->stats : LoadStats();
    stats.total_seconds = seconds;
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
  for (Delivery& d : deliveries) d.waiter->Finish(std::move(d.result));
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
      core::MutexLock lock(&l->hash_mu);
      l->sha256 = *sha;
    }
  });
}

}  // namespace metaload::cache
