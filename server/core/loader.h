// The streaming loader: the web UI's LoadStateDictOnMeta, done right. Takes a module built under
// InitializeOnMeta (no memory) and a checkpoint, and gives every parameter and buffer real data
// on the target device, converting dtypes there.
//
// Per tensor: the shape must match (else FAILED_PRECONDITION naming the key and both shapes);
// the dtype comes from the DtypePolicy (integer and bool tensors are never converted; float8 is
// held as bytes and the slot tagged with its format, module.h); the
// destination is allocated on the device and filled in chunks by `threads` workers (page faults
// on fresh destination memory dominate on CPU, so first-touch is split across them), each
// converting its chunk as it goes. Strict by default: missing keys fail the load, listing the
// first 20 and a count; with allow_missing_keys they become zeros and are reported. Unexpected
// keys are always reported. After a load no tensor is left on meta (checked).
//
// zero_copy (CPU only): tensors whose dtype needs no conversion and whose bytes are aligned view
// the file's mapping instead of being copied (the mapping lives as long as the tensors); the
// others fall back to copying, and the report counts them. Such tensors are read-only.
//
// Failure or cancellation (checked between chunks) leaves the module untouched (still on meta)
// and frees everything the load allocated before returning.
//
// host_arena (CPU only): the destinations that are copied into are carved out of one block of
// the arena's (core::HostArena, kept faulted between loads), which goes back to the arena when
// the last of them is freed; the report counts the bytes that were faulted already.
//
// Devices: "cpu", "cuda", "cuda:N" through device-generic ATen calls. Off the CPU, chunks go
// through a StagingRing of pinned host buffers: a worker reads a chunk into a free slot, the
// copy to the device runs asynchronously on a side stream (in the stored dtype; the conversion
// runs on the device), and an event per slot tells when the slot may be refilled. On the CPU the
// same ring, with plain buffers and synchronous copies, carries the chunks that convert (and all
// chunks with `staged`, as the tests use it). Thread-safe for distinct modules.
#ifndef METALOAD_SERVER_CORE_LOADER_H_
#define METALOAD_SERVER_CORE_LOADER_H_

#include <c10/core/Device.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/core/checkpoint.h"
#include "server/core/dtype_policy.h"
#include "server/core/host_arena.h"
#include "server/core/module.h"
#include "server/core/progress_reporter.h"

namespace metaload::core {

struct LoadOptions {
  // Where the tensors go (parsed once, where the request is: core::ParseDevice).
  c10::Device device = c10::kCPU;
  // Which dtype each tensor loads as: the effective policy, the architecture's defaults already
  // applied (models::EffectivePolicy); the loader only resolves it per key. Default: as stored.
  DtypePolicy policy;
  // Missing keys become zeros instead of failing the load.
  bool allow_missing_keys = false;
  // CPU only: tensors view the file's mapping where no conversion is needed.
  bool zero_copy = false;
  // Workers filling destinations.
  int threads = 2;
  // Bytes one worker moves at a time (and the size of a staging slot).
  uint64_t chunk_bytes = 16 << 20;
  // Host staging for devices other than the CPU: up to this many bytes of pinned memory, in
  // slots of chunk_bytes (at least two, at most two per worker; one per worker on the CPU).
  uint64_t staging_bytes = 64 << 20;
  // CPU destinations from this arena (see above); nullptr: fresh memory for each tensor.
  HostArena* host_arena = nullptr;
  // Use the staged pipeline on the CPU too (tests exercise the GPU path's code this way).
  bool staged = false;
  // Set to true (from any thread) to abort; the load then returns CANCELLED.
  const std::atomic<bool>* cancel = nullptr;
  // Called (serialised, from a loader thread) at least every 100 ms or 64 MiB, and once with
  // phase "done". Must be cheap.
  std::function<void(const LoadProgress&)> progress;
  // The checkpoint key a module tensor loads from; identity when unset. Lets an architecture
  // accept several key layouts (e.g. GPT-2 with and without "transformer.").
  std::function<std::string(const std::string& module_name)> checkpoint_key;
};

struct LoadReport {
  double seconds = 0;
  uint64_t bytes_read = 0;    // checkpoint bytes read (0 for zero-copy views)
  uint64_t loaded_bytes = 0;  // bytes of the loaded tensors
  // The load's own peak, counted by the loader (not sampled from the process, whose RSS
  // high-water mark and CUDA allocator peak concurrent loads share): the bytes it allocated
  // on the host (CPU destinations and zero-fills, staging slots) and on the device
  // (destinations, zero-fills, the conversion scratch), all held at once during the fill. Not
  // included: the page cache and mapped file pages (zero_copy views count 0), LibTorch's
  // internal scratch, other threads' allocations.
  int64_t peak_host_bytes = 0;
  int64_t peak_device_bytes = 0;
  int tensors = 0;
  int converted = 0;            // tensors whose dtype changed
  int zero_copy = 0;            // tensors viewing the mapping
  int zero_copy_fallbacks = 0;  // zero_copy asked for but copied (conversion or misalignment)
  int staging_slots = 0;        // slots in the staging ring (0: every chunk read in place)
  // With host_arena: destination bytes that came from memory the arena kept (faulted already).
  uint64_t arena_reused_bytes = 0;
  std::vector<std::string> missing_keys;     // with allow_missing_keys: zero-filled
  std::vector<std::string> unexpected_keys;  // in the checkpoint, not in the module
};

// What LoadModule refuses before it looks at the checkpoint: zero_copy off the CPU
// (INVALID_ARGUMENT). Callers that take requests check it when they parse one, so that a bad
// request is refused before it is admitted (and evicts nothing).
absl::Status CheckLoadOptions(const LoadOptions& options);

absl::StatusOr<LoadReport> LoadModule(Module& module, const CheckpointSource& source,
                                      const LoadOptions& options);

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_LOADER_H_
