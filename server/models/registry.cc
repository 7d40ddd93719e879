#include "server/models/registry.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "server/models/architecture_detector.h"
#include "server/models/module_model.h"

namespace metaload::models {

std::vector<std::string> ArchitectureNames() {
  return {"gpt2", "llama", "mlp", "sd1", "sd1-inpainting", "sd1-instruct-pix2pix", "torchscript"};
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
  if (name == "mlp") return BuildMlp(index);
  if (name == "gpt2") return BuildGpt2(index);
  if (name == "llama") return BuildLlama(index);
  if (name == "torchscript") return BuildTorchScript(index);
  // The variants differ only in the UNet's input channels, which the builder reads.
  if (name == "sd1" || name == "sd1-inpainting" || name == "sd1-instruct-pix2pix") {
    return BuildSd1(index);
  }
  if (name.rfind("sd", 0) == 0) {
    return absl::FailedPreconditionError(
        absl::StrCat(index.path, ": detected ", name, "; not supported yet"));
  }
  return absl::FailedPreconditionError(absl::StrCat("unknown architecture '", name, "' (",
                                                    absl::StrJoin(ArchitectureNames(), ", "), ")"));
}

}  // namespace metaload::models
