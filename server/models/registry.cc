#include "server/models/registry.h"

#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/models/architecture_detector.h"

namespace metaload::models {

// One per architecture (mlp.cc, gpt2.cc, stable_diffusion.cc, ...), called only from here.
absl::StatusOr<std::unique_ptr<Model>> BuildMlp(const core::CheckpointIndex& index);
absl::StatusOr<std::unique_ptr<Model>> BuildGpt2(const core::CheckpointIndex& index);
absl::StatusOr<std::unique_ptr<Model>> BuildLlama(const core::CheckpointIndex& index);
absl::StatusOr<std::unique_ptr<Model>> BuildSd1(const core::CheckpointIndex& index);
absl::StatusOr<std::unique_ptr<Model>> BuildSd2(const core::CheckpointIndex& index);
absl::StatusOr<std::unique_ptr<Model>> BuildSdxl(const core::CheckpointIndex& index);
absl::StatusOr<std::unique_ptr<Model>> BuildTorchScript(const core::CheckpointIndex& index);

namespace {

using Builder = absl::StatusOr<std::unique_ptr<Model>> (*)(const core::CheckpointIndex&);

// The builder column of the architecture table, by row name (architectures.h says why it is
// kept here). A row's builder also builds its variants.
const std::map<std::string, Builder>& Builders() {
  static const auto* builders = new std::map<std::string, Builder>{
      {"gpt2", BuildGpt2},
      {"llama", BuildLlama},
      {"mlp", BuildMlp},
      {"sd1", BuildSd1},
      {"sd2", BuildSd2},
      {"sdxl", BuildSdxl},
      {"torchscript", BuildTorchScript},
  };
  return *builders;
}

}  // namespace

std::vector<std::string> BuiltArchitectures() {
  std::vector<std::string> names;
  for (const auto& [name, builder] : Builders()) names.push_back(name);
  return names;
}

absl::StatusOr<std::unique_ptr<Model>> BuildModel(const std::string& architecture,
                                                  const core::CheckpointIndex& index) {
  std::string name = architecture;
  if (name.empty()) {
    DetectedArchitecture detected = DetectArchitecture(index);
    if (detected.name.empty()) {
      return absl::FailedPreconditionError(absl::StrCat(
          index.path, ": cannot tell the architecture (", core::CheckpointFormatName(index.format),
          ", ", index.tensors.size(), " tensors, first key '",
          index.tensors.empty() ? "" : index.tensors.front().name,
          "'); pass architecture explicitly (", absl::StrJoin(ArchitectureNames(), ", "), ")"));
    }
    name = detected.name;
  }
  if (index.format == core::CheckpointFormat::kTorchScript && name != "torchscript") {
    return absl::FailedPreconditionError(
        absl::StrCat(index.path, ": a TorchScript archive cannot be loaded as ", name));
  }
  const ArchitectureInfo* row = FindArchitecture(name);
  if (row == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat(
        "unknown architecture '", name, "' (", absl::StrJoin(ArchitectureNames(), ", "), ")"));
  }
  if (!row->loadable) {
    return absl::FailedPreconditionError(
        absl::StrCat(index.path, ": detected ", name, "; not supported yet"));
  }
  auto builder = Builders().find(row->name);
  if (builder == Builders().end()) {
    return absl::InternalError(absl::StrCat("architecture '", row->name,
                                            "' is in the table but has no builder (registry.cc)"));
  }
  return builder->second(index);
}

}  // namespace metaload::models
