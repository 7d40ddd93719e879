// The cache's record of one loaded model (Loaded), an Infer's hold on it (InUse), and the
// thread that frees models (Releaser). Internal to server/cache.
//
// Ownership: a Loaded is shared by every model_id whose slot names it and by running Infers
// (through InUse); the cache keeps a weak list of every Loaded still alive so that an unloaded
// model an Infer outlives still counts against the budget. When the last reference drops,
// wherever that is (under the cache's lock, on a gRPC thread), ~Loaded only queues the model on
// the Releaser; its memory is freed on the release thread.
//
// Thread-safety: Loaded's plain fields are written once, before it is published; its atomics
// and sha256 (under hash_mu) change afterwards. Releaser is thread-safe.
#ifndef METALOAD_SERVER_CACHE_LOADED_MODEL_H_
#define METALOAD_SERVER_CACHE_LOADED_MODEL_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "server/cache/model_cache.h"
#include "server/core/checkpoint.h"
#include "server/core/mutex.h"
#include "server/core/thread_pool.h"

namespace metaload::models {
class Model;
}  // namespace metaload::models

namespace metaload::cache {

// Wall-clock milliseconds, for ModelInfo.
int64_t NowMs();
// A process-wide use counter: strictly increasing, unlike wall-clock milliseconds (a load and
// a hit in the same millisecond once made LRU evict the model just used).
uint64_t NextUse();

// Frees models off the cache's lock and off the callers' threads (gRPC's among them): a
// model's last handle, wherever it drops, only queues the model here, and one thread frees it
// and hands the pages back to the kernel (malloc_trim). Admission stops counting a model once
// it is queued, so every load waits (Flush, on its load thread) for the frees queued before it
// to finish before it allocates: the budget holds in real memory, not only in the books.
// Destruction runs every queued free, then joins.
class Releaser {
 public:
  explicit Releaser(CacheObserver* observer) : observer_(observer) {}

  void Release(std::unique_ptr<models::Model> model, const std::string& device, int64_t bytes);
  // Returns once every free queued before the call is done. Never call it on the release
  // thread (an observer's OnModelFreed) or under the cache's lock.
  void Flush();

 private:
  CacheObserver* const observer_;
  core::ThreadPool pool_{1};
};

struct Loaded {
  ~Loaded();  // queues the model on the releaser

  std::shared_ptr<Releaser> releaser;

  std::string key, path, architecture, device, dtype;
  LoadSpec spec;  // as it was loaded (model_id: the first caller's), to load it again
  std::unique_ptr<models::Model> model;
  std::vector<core::CheckpointFile> files;
  int64_t parameter_count = 0, resident_bytes = 0, loaded_at_ms = 0;
  std::vector<models::EntrySpec> entries;
  std::optional<models::DiffusionInfo> diffusion;  // the request's prediction applied
  std::string vae_path;                            // as the request named it
  LoadStats stats;
  bool pinned = false;
  std::atomic<int64_t> last_used_ms{0};
  std::atomic<uint64_t> last_use{0};  // NextUse() at the last use: LRU order
  std::atomic<int64_t> infer_count{0};
  std::atomic<int> active{0};  // Infers holding it; only through InUse
  mutable core::Mutex hash_mu;
  std::string sha256 ABSL_GUARDED_BY(hash_mu);

  std::string Sha256() const {
    core::MutexLock lock(&hash_mu);
    return sha256;
  }
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

}  // namespace metaload::cache

#endif  // METALOAD_SERVER_CACHE_LOADED_MODEL_H_
