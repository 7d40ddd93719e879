// ModelCache: the loaded models, by model_id, as ref-counted handles.
//
// - Single flight: loads are keyed by (resolved path, file identity, architecture, device,
//   requested dtypes, compute dtypes, zero_copy, allow_missing_keys; load_key.h). The identity is
//   the device, inode, size, mtime and ctime of the file, or of every file of a directory (two
//   levels deep): a shard rewritten in place is a new key. Identical concurrent loads share one;
//   each caller holds a LoadWaiter, and the load is aborted only when every waiter has cancelled.
// - A model_id names one key. Loading a different key under a used id is ALREADY_EXISTS unless
//   `replace`: then the new load runs in the background and is swapped in atomically once READY
//   (the old model serves until then, and is freed when its last user is done). Under a budget
//   that cannot hold both, the old model is evicted first, once the Infers running on it have
//   ended (new Infers on the id are refused meanwhile: NOT_FOUND, as while it loads); if the new
//   load then fails or is cancelled, the old model is loaded again under its ids (unless they
//   were unloaded meanwhile).
// - Handles: Infer holds the model for its duration, so Unload and eviction never free a model
//   under a running Infer; they mark it UNLOADING and the memory goes with the last handle.
// - Admission before allocation: the bytes a load needs are known from the checkpoint header,
//   the model's skeleton and the dtype policy (models::Model::EstimateBytes: an upper bound,
//   zero-filled missing keys included). Idle, unpinned models on the device are evicted
//   least-recently-used first; if the budget still cannot fit it, the load fails with
//   RESOURCE_EXHAUSTED before touching memory. TorchScript, whose code decides what it
//   allocates, is admitted at its file size and counted as measured once loaded; over the
//   budget then, it fails the same way and is freed. A budget derived from free memory follows
//   it (Options::budget_follows_available).
// - Loads run on a bounded pool, Infer on another, sha256 hashing on a third (in the
//   background, after a load): none on the caller's thread.
// - Frees: wherever a model's last handle drops (Unload and eviction, under the lock; an Infer
//   that outlived an Unload), the model is only queued; one release thread frees it and trims
//   the heap, never under the lock nor on a gRPC thread. A load waits for the frees queued
//   before it to finish before it allocates, so the budget holds in real memory.
// - Host arena (Options::host_arena): CPU loads carve their destinations out of memory kept
//   faulted from models that went (core::HostArena). What it keeps is no model's: admission
//   counts it as free, and at each admission on the CPU the arena is trimmed so that models,
//   loads in flight and kept memory together stay within the budget (a take of fresh memory
//   gives back as much kept memory first, host_arena.h). Where the budget follows free memory,
//   the kept bytes count as free.
// - No exception escapes: LibTorch and JSON calls run inside core::CatchExceptions (out of
//   memory: RESOURCE_EXHAUSTED), and an Infer holds its model through an RAII handle, so no
//   failure leaves a model counted as in use. Errors name the path as the caller gave it.
//
// This header is free of LibTorch and gRPC types. Thread-safe.
#ifndef METALOAD_SERVER_CACHE_MODEL_CACHE_H_
#define METALOAD_SERVER_CACHE_MODEL_CACHE_H_

#include <atomic>
#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/cache/infer_limits.h"
#include "server/cache/wire_tensor.h"
#include "server/core/mutex.h"
#include "server/models/diffusion_info.h"
#include "server/models/entry_spec.h"

namespace metaload::core {
class ChecksumStore;
class HostArena;
class ThreadPool;
struct CheckpointIndex;
}  // namespace metaload::core

namespace metaload::models {
class Model;
}  // namespace metaload::models

namespace metaload::cache {

struct LoadSpec {
  std::string model_id;      // never empty (the service defaults it to the path's stem)
  std::string path;          // resolved absolute path inside a model root
  std::string display_path;  // the path as the caller gave it, for messages and ModelInfo
  std::string architecture;  // "" = detect
  std::string device = "cpu";
  // Validated by the service (core::ParseStorageDtype); parsed once by Load. "" and no
  // overrides: the architecture's default dtypes (models::EffectivePolicy); "keep": the file's.
  std::string dtype;
  std::map<std::string, std::string> dtype_overrides;
  // How each network computes (see models::Model::Load); default: the device's default for its
  // storage dtype.
  models::ComputeChoice compute;
  // Diffusion models: "epsilon" or "v" over the model's own (models::DiffusionInfo); "" keeps
  // it. Validated by the service; FAILED_PRECONDITION for a model that is not a diffusion one.
  std::string prediction;
  // Stable Diffusion: the VAE ("first_stage_model.") from this file instead of the checkpoint's
  // (core::CheckpointSource::Options::overlay_path): resolved inside a model root like `path`,
  // with the caller's form for messages. Empty: the checkpoint's own.
  std::string vae_path, vae_display_path;
  bool allow_missing_keys = false;
  bool zero_copy = false;
  bool replace = false;
  bool pin = false;
};

struct ModelInfo {
  std::string model_id, path, architecture, device, dtype, state;  // LOADING READY UNLOADING
  int64_t parameter_count = 0;
  int64_t resident_bytes = 0;
  std::string sha256, short_hash;
  std::vector<models::EntrySpec> entries;
  int64_t loaded_at_unix_ms = 0, last_used_unix_ms = 0, infer_count = 0;
  std::optional<models::DiffusionInfo> diffusion;  // the request's prediction applied
  std::string vae_path;  // the VAE file as the request named it; empty: the checkpoint's own
};

struct LoadStats {
  double total_seconds = 0, build_seconds = 0, read_seconds = 0;
  int64_t bytes_read = 0;
  // The load's own peak, counted by the loader (core::LoadReport): not disturbed by loads
  // running at the same time.
  int64_t peak_host_bytes = 0, peak_device_bytes = 0;
  // Bytes of the model that came from the host arena's kept memory (faulted already).
  int64_t arena_reused_bytes = 0;
  std::vector<std::string> unexpected_keys;
};

struct LoadResult {
  ModelInfo model;
  bool cache_hit = false;
  LoadStats stats;
};

struct LoadProgressEvent {
  std::string phase;  // "queued", "build", "read", "done"
  int64_t bytes_done = 0;
  int64_t bytes_total = 0;
};

// Hooks for metrics; called from cache threads, must be cheap. All optional.
class CacheObserver {
 public:
  virtual ~CacheObserver() = default;
  // result: "hit", "miss", "coalesced".
  virtual void OnCacheRequest(const std::string& result) {}
  // outcome: "ok", "error", "cancelled"; stats are meaningful for "ok".
  virtual void OnLoadFinished(const std::string& model_id, const std::string& architecture,
                              const std::string& device, const std::string& outcome,
                              const LoadStats& stats, int64_t loaded_bytes) {}
  virtual void OnEviction(const std::string& device) {}
  virtual void OnModelRemoved(const std::string& model_id) {}
  // A successful Infer, reported only while model_id still holds the model that ran it.
  virtual void OnInfer(const std::string& model_id, double seconds) {}
  // A model's memory was freed and the heap trimmed, `seconds` it took; on the release thread.
  virtual void OnModelFreed(const std::string& device, int64_t bytes, double seconds) {}
};

class LoadWaiter;
class Releaser;
struct Flight;
struct Loaded;

class ModelCache {
 public:
  struct Options {
    // Device -> bytes. A device without an entry has no limit beyond what is free.
    std::map<std::string, int64_t> budgets;
    int load_threads = 2;
    int infer_threads = 2;
    // Optional: sha256 of checkpoints, in the background after each load.
    core::ChecksumStore* checksums = nullptr;
    CacheObserver* observer = nullptr;
    // Optional: CPU destinations from this arena (see above); it must outlive the cache.
    core::HostArena* host_arena = nullptr;
    // Canonical model roots every file a load opens must lie in (symlinks resolved); empty: no
    // restriction. The daemon passes --model_root.
    std::vector<std::string> model_roots;
    // TorchScript archives are programs: loading one runs the file's code (and every Infer runs
    // its forward). false: FAILED_PRECONDITION naming the file, whatever it is called.
    bool allow_torchscript = false;
    // What one Infer may cost, checked before it is queued (infer_limits.h states the rule);
    // over a limit: RESOURCE_EXHAUSTED without computing. Default: no limits.
    InferLimits infer_limits;
    // Devices whose budget was not given but derived from what was free at start (the daemon's
    // default "cpu" budget): at each admission their effective budget is at most the bytes the
    // cache's models hold plus 80% of available_bytes(device) at that moment, after the frees
    // queued before it finished. So memory other processes took since the start is not
    // promised twice. Empty: budgets are used as given.
    std::set<std::string> budget_follows_available;
    // Bytes free on a device now; -1 unknown. Default: MemAvailable for "cpu" (tests fake it).
    std::function<int64_t(const std::string& device)> available_bytes = DefaultAvailableBytes;
    // Builds a model's skeleton for a checkpoint. Empty: models::BuildModel. The seam for tests
    // (tests/cache/fake_model.h: a model whose load waits on a latch, so a race is set up
    // step by step instead of timed against a real load).
    std::function<absl::StatusOr<std::unique_ptr<models::Model>>(
        const std::string& architecture, const core::CheckpointIndex& index)>
        build_model;
  };

  // MemAvailable (/proc/meminfo) for "cpu"; -1 for other devices.
  static int64_t DefaultAvailableBytes(const std::string& device);

  // The load pool right now: what a liveness probe needs to tell a wedged pool (every thread
  // held by a load that does not finish) from a busy one.
  struct RunningLoad {
    std::string model_id;      // the first caller's id
    std::string display_path;  // as the caller gave it
    double seconds = 0;        // since it started running (not since it was queued)
  };
  struct LoadActivity {
    int threads = 0;                   // the pool's size (Options::load_threads)
    std::vector<RunningLoad> running;  // loads on a pool thread now, oldest first
    int queued = 0;                    // loads waiting for a thread
    int infers_running = 0;            // Infer calls on the infer pool now
  };
  LoadActivity Activity() const;

  using ProgressFn = std::function<void(const LoadProgressEvent&)>;
  using DoneFn = std::function<void(absl::StatusOr<LoadResult>)>;
  using InferDoneFn = std::function<void(absl::StatusOr<std::vector<WireTensor>>)>;

  explicit ModelCache(Options options);
  ~ModelCache();  // cancels loads in flight and waits for the pools

  // Starts or joins a load. `done` runs exactly once unless the returned waiter's Cancel()
  // returns true; it may run inline (cache hits, immediate errors) or on a cache thread.
  std::shared_ptr<LoadWaiter> Load(const LoadSpec& spec, ProgressFn progress, DoneFn done);

  absl::StatusOr<ModelInfo> Get(const std::string& model_id) const;
  std::vector<ModelInfo> List() const;
  // NOT_FOUND for an unknown id. The returned state is UNLOADING while Infers still hold it.
  absl::StatusOr<ModelInfo> Unload(const std::string& model_id);

  // Runs `entry` ("" = default) on the infer pool; `done` runs exactly once.
  void Infer(const std::string& model_id, const std::string& entry, std::vector<WireTensor> inputs,
             bool typed_outputs, InferDoneFn done);

  // What the host arena keeps now and has handed out again since start; nullopt without one.
  struct ArenaFigures {
    int64_t kept_bytes = 0, reused_bytes_total = 0;
  };
  std::optional<ArenaFigures> Arena() const;

  // Bytes held by loaded models (including unloaded ones still used by an Infer), per device.
  std::map<std::string, int64_t> ResidentBytes() const;
  const std::map<std::string, int64_t>& budgets() const { return options_.budgets; }

 private:
  friend class LoadWaiter;
  struct Slot;
  struct Prepared;
  struct Delivery;

  // A flight's load, on a load thread, in five steps; TF Serving's split of approving a load
  // from executing it (model_cache_load.cc):
  void RunLoad(std::shared_ptr<Flight> flight);
  // 1. Prepare, no lock: opens the checkpoint, refuses TorchScript unless allowed, builds the
  //    skeleton on meta, resolves the effective dtype policy and estimates the bytes.
  absl::StatusOr<Prepared> Prepare(const Flight& flight);
  // 2. Approve, under mu_: admission (admission.h) on the flight's device; the victims leave
  //    their slots and are moved into `victims` (freed by the caller once unlocked), `need` is
  //    reserved for the flight. RESOURCE_EXHAUSTED ("'path' <verb> N on cpu; the budget is
  //    ...") when it cannot fit. `available`: AvailableBytes, taken before locking.
  //    `approval` (optional) receives what the first approval of a load needs to know besides.
  struct Approval {
    // In: whether this approval may report waits_for_replaced instead of refusing (the first
    // approval of a load; not TorchScript's second, after its code ran).
    bool may_wait = false;
    // The bytes the host arena may keep on the device from now on: the budget less what
    // models hold and loads in flight reserved, before this one's need; -1 without a budget.
    int64_t arena_room = -1;
    // Refused only because a model this load replaces is running an Infer: it would fit once
    // that ends (a switch under a budget of one). Its slots are marked draining meanwhile.
    bool waits_for_replaced = false;
  };
  absl::Status ApproveLocked(Flight& flight, int64_t need, int64_t available, const char* verb,
                             std::vector<std::shared_ptr<Loaded>>* victims,
                             Approval* approval = nullptr) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // 3. Execute, no lock: streams the weights in. A model that holds more than was approved
  //    (TorchScript's code decides) is approved again for what it holds, or refused and freed.
  absl::StatusOr<std::shared_ptr<Loaded>> Execute(Flight& flight, Prepared prepared);
  // 4. Publish, under mu_: the reservation ends, the model enters the slots of the ids that
  //    still want it, and each waiter's result is collected.
  std::vector<Delivery> PublishLocked(Flight& flight, const absl::Status& status,
                                      const std::shared_ptr<Loaded>& loaded)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // 5. Notify, no lock: metrics, logs, the background hash; then the waiters hear. The flight's
  //    own references drop before that, so frees happen here, never under mu_.
  void Notify(const Flight& flight, const absl::Status& status, std::shared_ptr<Loaded> loaded,
              std::vector<Delivery> deliveries, double seconds);

  bool CancelWaiter(LoadWaiter* waiter);
  int64_t HeldBytesLocked(const std::string& device) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Free bytes on `device` for the effective budget, or -1 when its budget is used as given.
  // Waits for queued frees; call without mu_.
  int64_t AvailableBytes(const std::string& device);
  static int64_t ClampBytes(uint64_t bytes);
  ModelInfo InfoLocked(const std::string& id, const Loaded& loaded, const std::string& state) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void StartHash(const std::shared_ptr<Loaded>& loaded);

  Options options_;
  // Frees models on its own thread; declared before the models so that it outlives them all
  // (the last of them queues its free here during ~ModelCache).
  std::shared_ptr<Releaser> releaser_;
  mutable core::Mutex mu_;
  std::map<std::string, std::unique_ptr<Slot>> slots_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::shared_ptr<Flight>> flights_ ABSL_GUARDED_BY(mu_);  // by key
  // Every model still alive (in a slot, or unloaded but held by an Infer): admission counts
  // them all.
  std::vector<std::weak_ptr<Loaded>> alive_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, int64_t> reserved_ ABSL_GUARDED_BY(mu_);  // device -> bytes
  // Flights running on a load thread, with when they started.
  std::map<const Flight*, std::chrono::steady_clock::time_point> running_ ABSL_GUARDED_BY(mu_);
  int queued_ ABSL_GUARDED_BY(mu_) = 0;  // flights submitted, not yet running
  std::atomic<int> infers_running_{0};   // Infer tasks executing on the infer pool
  std::unique_ptr<core::ThreadPool> load_pool_;
  std::unique_ptr<core::ThreadPool> infer_pool_;
  std::unique_ptr<core::ThreadPool> hash_pool_;
  std::atomic<bool> stopping_{false};  // set by the destructor
};

// One caller's interest in a load.
class LoadWaiter {
 public:
  // Leaves the load. True: `done` will never be called for this waiter. False: it already ran
  // or is running.
  bool Cancel();

 private:
  friend class ModelCache;
  // The callbacks run under callback_mu_, so Cancel() can promise that none runs after it
  // returned true.
  void Deliver(const LoadProgressEvent& event);
  void Finish(absl::StatusOr<LoadResult> result);

  ModelCache* cache_ = nullptr;
  std::string model_id_;
  ModelCache::ProgressFn progress_;
  ModelCache::DoneFn done_;
  std::weak_ptr<Flight> flight_;  // guarded by the cache's mu_
  core::Mutex callback_mu_;
  bool cancelled_ ABSL_GUARDED_BY(callback_mu_) = false;
  bool finished_ ABSL_GUARDED_BY(callback_mu_) = false;
};

}  // namespace metaload::cache

#endif  // METALOAD_SERVER_CACHE_MODEL_CACHE_H_
