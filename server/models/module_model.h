// Shared plumbing of the architectures built from the layer kit: loading through the streaming
// loader, input validation against the entry specs, device and dtype of the loaded weights.
// Internal to server/models.
#ifndef METALOAD_SERVER_MODELS_MODULE_MODEL_H_
#define METALOAD_SERVER_MODELS_MODULE_MODEL_H_

#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "server/core/module.h"
#include "server/models/model.h"

namespace metaload::models {

class ModuleModel : public Model {
 public:
  absl::StatusOr<core::LoadReport> Load(const core::CheckpointSource& source,
                                        core::LoadOptions options,
                                        const ComputeChoice& compute) override;
  std::vector<EntrySpec> LoadedEntries() const override;
  absl::StatusOr<NamedTensors> Run(const std::string& entry,
                                   const std::map<std::string, at::Tensor>& inputs) const override;
  // Exact: the loader allocates one tensor per slot (core::LoadModule).
  ByteEstimate EstimateBytes(const core::CheckpointIndex& index, const core::DtypePolicy& policy,
                             bool allow_missing_keys) const override;
  int64_t ParameterCount() const override;
  uint64_t ResidentBytes() const override;

 protected:
  // `module` is built on meta by the subclass's constructor.
  void SetModule(std::unique_ptr<core::Module> module) { module_ = std::move(module); }
  core::Module& module() const { return *module_; }
  // The module-name prefix of the network an entry runs (all of the module by default). After
  // loading, the network computes in core::DefaultComputeDtype of the dtype most of its
  // floating values are stored in; the entry's floating inputs are cast to it. Entries'
  // prefixes are equal or disjoint.
  virtual std::string EntryPrefix(const std::string& entry) const { return ""; }
  // Maps module tensor names to checkpoint keys; identity unless a subclass sets one.
  void SetKeyMap(std::function<std::string(const std::string&)> map) { key_map_ = std::move(map); }

  // The validated inputs (moved to the weights' device; floating inputs cast to the entry's
  // compute dtype).
  virtual absl::StatusOr<NamedTensors> Forward(
      const std::string& entry, const std::map<std::string, at::Tensor>& inputs) const = 0;

 private:
  std::unique_ptr<core::Module> module_;
  std::function<std::string(const std::string&)> key_map_;
  struct NetworkDtypes {
    core::DType storage;     // of most of the network's floating values
    at::ScalarType compute;  // what the entry's floating inputs are cast to
  };
  std::map<std::string, NetworkDtypes> entry_dtypes_;  // by entry name, once loaded
  c10::Device device_ = c10::Device(c10::kCPU);
};

// config.json helpers: FAILED_PRECONDITION naming the architecture and key when missing/bad.
absl::StatusOr<nlohmann::json> ParseConfig(const core::CheckpointIndex& index,
                                           const std::string& arch);
absl::StatusOr<int64_t> ConfigInt(const nlohmann::json& config, const char* key,
                                  const std::string& arch,
                                  std::optional<int64_t> fallback = std::nullopt);
absl::StatusOr<double> ConfigDouble(const nlohmann::json& config, const char* key,
                                    const std::string& arch,
                                    std::optional<double> fallback = std::nullopt);
absl::StatusOr<std::string> ConfigString(const nlohmann::json& config, const char* key,
                                         const std::string& arch, std::string fallback);
absl::StatusOr<bool> ConfigBool(const nlohmann::json& config, const char* key,
                                const std::string& arch, bool fallback);

}  // namespace metaload::models

#endif  // METALOAD_SERVER_MODELS_MODULE_MODEL_H_
