// A model metaload can load and run: a module tree (built on meta, filled by the loader) plus
// named entries (forward functions) with typed inputs and outputs. Implementations live in one
// file per architecture and are created through the registry (registry.h).
//
// Lifecycle: built on meta by the registry, loaded once (LoadInto), then Run from any number of
// threads at once (Run is const and only reads weights).
#ifndef METALOAD_SERVER_MODELS_MODEL_H_
#define METALOAD_SERVER_MODELS_MODEL_H_

#include <ATen/core/Tensor.h>

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "server/core/checkpoint.h"
#include "server/core/dtype.h"
#include "server/core/dtype_policy.h"
#include "server/core/loader.h"
#include "server/models/diffusion_info.h"
#include "server/models/entry_spec.h"

namespace metaload::models {

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

// A dtype policy as an architecture states its default (see core::DtypePolicy::Create).
struct DtypeChoice {
  std::string dtype;  // "" = the architecture's default, "keep" = the file's, or a dtype name
  std::map<std::string, std::string> overrides;
};

class Model {
 public:
  virtual ~Model() = default;

  virtual std::string architecture() const = 0;
  // The first entry is the default one (an empty entry name in Infer).
  virtual std::vector<EntrySpec> Entries() const = 0;
  // Entries() with each entry's storage and compute dtypes, once loaded.
  virtual std::vector<EntrySpec> LoadedEntries() const { return Entries(); }

  // Fills the model from the checkpoint (see core::LoadModule); `options` say where and how the
  // weights are stored (options.policy is the effective policy: EffectivePolicy), `compute` how
  // each network computes (see ComputeChoice; by default float32 on a CPU for float16 and
  // bfloat16 storage). A compute dtype the device has no kernels for (float16 on a CPU) is
  // FAILED_PRECONDITION here, not at the first Infer; an unknown entry in `compute.by_entry` or
  // two that disagree about one network INVALID_ARGUMENT. Models without a module tree
  // (TorchScript) load their own way.
  virtual absl::StatusOr<core::LoadReport> Load(const core::CheckpointSource& source,
                                                core::LoadOptions options,
                                                const ComputeChoice& compute) = 0;

  // Runs `entry` on inputs given by name; checks names, dtypes and ranks against the entry's
  // spec (INVALID_ARGUMENT naming the input). Runs under InferenceMode on the model's device.
  virtual absl::StatusOr<NamedTensors> Run(
      const std::string& entry, const std::map<std::string, at::Tensor>& inputs) const = 0;

  // The dtypes a load gets when it names none (empty dtype, no overrides): Stable Diffusion's
  // are the web UI's (UNet and text encoder float16, the VAE as stored); the others keep the
  // file's dtypes. Applied in one place: EffectivePolicy.
  virtual DtypeChoice DefaultDtypes() const { return {}; }

  // What Load will allocate on the device for the model's weights under `policy` (the
  // effective one), known before anything is allocated: every tensor the model holds, in the
  // dtype the policy resolves for it, and with `allow_missing_keys` the zero-filled tensors of
  // keys the checkpoint lacks (a 4 KB directory once claimed 64 GiB of zeros). The cache admits
  // this figure against the budget before loading.
  // IMPORTANT: where `upper_bound` is true, `bytes` must be an upper bound of ResidentBytes()
  // after a successful Load; saturates instead of overflowing. A model that cannot know before
  // loading (TorchScript runs the file's code) says upper_bound = false and gives its best
  // guess; the cache then counts ResidentBytes() after the load and refuses a model that does
  // not fit then.
  struct ByteEstimate {
    uint64_t bytes = 0;
    bool upper_bound = true;
  };
  virtual ByteEstimate EstimateBytes(const core::CheckpointIndex& index,
                                     const core::DtypePolicy& policy,
                                     bool allow_missing_keys) const = 0;

  // Diffusion models: what the UNet predicts and the VAE's scale, once loaded (the prediction
  // may be read from the weights). nullopt for every other model.
  virtual std::optional<DiffusionInfo> Diffusion() const { return std::nullopt; }

  // Values in the model's parameters after loading (buffers are not counted).
  virtual int64_t ParameterCount() const = 0;
  // Bytes the loaded model holds on its device: every distinct storage it references.
  virtual uint64_t ResidentBytes() const = 0;
};

// The one place the architecture's default applies: `requested` (core::DtypePolicy::FromRequest)
// when the request names dtypes, else `model`'s DefaultDtypes() with float8 tensors kept
// float8. INVALID_ARGUMENT only for an architecture whose defaults do not parse (a bug).
absl::StatusOr<core::DtypePolicy> EffectivePolicy(
    const Model& model, const std::optional<core::DtypePolicy>& requested);
// The same from a request's strings, for callers that have no parsed request (tests, benchmarks,
// the CLI's offline commands); INVALID_ARGUMENT for a bad name.
absl::StatusOr<core::DtypePolicy> EffectivePolicy(
    const Model& model, absl::string_view dtype,
    const std::map<std::string, std::string>& overrides = {});

}  // namespace metaload::models

#endif  // METALOAD_SERVER_MODELS_MODEL_H_
