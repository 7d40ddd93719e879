// Admission: whether a load of `need` bytes fits a device's budget, and which idle models to
// evict first. A pure function of the numbers the cache hands it under its lock (ModelCache's
// approve step applies the result: it reserves the bytes and moves the victims out). No
// LibTorch, no locks, no clock: tests/cache/admission_test.cc is a table with one row per rule.
//
// The rules, in order:
// - A device without a budget admits everything and evicts nothing.
// - The effective limit is the budget; where the budget follows free memory (`available` >= 0)
//   it is at most what the models hold plus 80% of `available` (memory other processes took
//   since the start is not promised twice). Fixed for this admission, so evicting a model makes
//   room by its bytes.
// - Used bytes are every model still alive (`held`, in a slot or only in use by an Infer) plus
//   the bytes admitted to loads in flight (`reserved`).
// - Nothing is evicted for a load that would not fit even with every evictable model gone.
// - Evictable: unpinned and not in use (no Infer holds it). Least recently used first.
// - A model the load will replace (one of the load's ids holds it) serves until its successor
//   is ready, so it is spared, unless nothing else can make room: then it goes too (the web
//   UI's checkpoint switch under a budget of one model).
#ifndef METALOAD_SERVER_CACHE_ADMISSION_H_
#define METALOAD_SERVER_CACHE_ADMISSION_H_

#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

namespace metaload::cache {

// One distinct model in a slot on the device (a model shared by several ids appears once).
struct Resident {
  int64_t bytes = 0;
  uint64_t last_use = 0;  // larger: used more recently
  bool pinned = false;
  bool in_use = false;    // an Infer holds it
  bool replaced = false;  // one of the load's own ids holds it
};

struct AdmissionRequest {
  int64_t need = 0;
  std::optional<int64_t> budget;  // nullopt: no budget on this device
  int64_t available = -1;         // free bytes now where the budget follows them; else -1
  int64_t held = 0;               // bytes every alive model holds on the device
  int64_t reserved = 0;           // bytes admitted to loads in flight on the device
  std::vector<Resident> residents;
};

struct Admission {
  bool admitted = false;
  int64_t limit = 0;          // the effective budget (INT64_MAX without one)
  int64_t used = 0;           // held + reserved after the evictions, before adding `need`
  std::vector<size_t> evict;  // indices into `residents`, in eviction order
};

// The decision for `request` (see the rules above). Byte figures must be far from overflowing
// (the cache clamps them to INT64_MAX / 4).
Admission Admit(const AdmissionRequest& request);

}  // namespace metaload::cache

#endif  // METALOAD_SERVER_CACHE_ADMISSION_H_
