// A load in progress (Flight) and a model_id's place in the cache (ModelCache::Slot). Internal
// to server/cache: shared by model_cache.cc (requests, queries, Infer) and model_cache_load.cc
// (the load's steps).
//
// Ownership: the cache's flights_ map and every waiting caller's LoadWaiter share a Flight; a
// slot holds the model an id serves (current) and the flight that will replace it (pending).
// Thread-safety: the fields marked so are guarded by the cache's mu_; `cancel` is atomic; the
// rest is written before the flight is published and then only read.
#ifndef METALOAD_SERVER_CACHE_FLIGHT_H_
#define METALOAD_SERVER_CACHE_FLIGHT_H_

#include <c10/core/Device.h>

#include <atomic>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "server/cache/loaded_model.h"
#include "server/cache/model_cache.h"
#include "server/core/dtype_policy.h"

namespace metaload::cache {

struct Flight {
  std::string key;  // load_key.h
  LoadSpec spec;    // spec.device canonical
  // The request's device and dtypes, parsed once (ModelCache::Load).
  c10::Device device = c10::kCPU;
  std::optional<core::DtypePolicy> requested;  // nullopt: the architecture's default
  std::atomic<bool> cancel{false};
  std::vector<std::shared_ptr<LoadWaiter>> waiters;  // guarded by the cache's mu_
  int64_t reserved = 0;  // bytes approved for it and not yet published; guarded by mu_
  // What a replace evicted from its own ids (a budget that holds one of them): if the load
  // fails or is cancelled, each id gets its old model back by loading it again (out of the
  // host arena's memory, at copy speed). Ids unloaded meanwhile are left alone. Guarded by mu_.
  std::vector<std::pair<std::string, LoadSpec>> restore;
  std::set<std::string> unloaded;
};

struct ModelCache::Slot {
  std::shared_ptr<Loaded> current;
  std::shared_ptr<Flight> pending;
  // The pending replace waits for the Infers running on `current` to end before it evicts it
  // (a budget that holds one of them): Infers arriving now are refused, so a stream of them
  // cannot hold the switch off.
  bool draining = false;
};

// Errors from below name the resolved absolute path; the caller sees the path it gave.
absl::Status AsCallerSees(const absl::Status& status, const LoadSpec& spec);

}  // namespace metaload::cache

#endif  // METALOAD_SERVER_CACHE_FLIGHT_H_
