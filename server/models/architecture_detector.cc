#include "server/models/architecture_detector.h"

#include <nlohmann/json.hpp>

#include "absl/strings/match.h"
#include "server/models/architectures.h"
#include "server/models/ldm_layout.h"

namespace metaload::models {
namespace {

bool HasKey(const core::CheckpointIndex& index, absl::string_view name) {
  return index.Find(name) != nullptr;
}

bool HasPrefix(const core::CheckpointIndex& index, absl::string_view prefix) {
  auto it = index.by_name.lower_bound(std::string(prefix));
  return it != index.by_name.end() && absl::StartsWith(it->first, prefix);
}

std::string FromConfig(const std::string& config_json) {
  nlohmann::json config = nlohmann::json::parse(config_json, nullptr, /*allow_exceptions=*/false);
  if (!config.is_object()) return "";
  // Any JSON may be here: a model_type that is no string is ignored, never thrown over.
  auto model_type = config.find("model_type");
  const std::string type =
      model_type != config.end() && model_type->is_string() ? model_type->get<std::string>() : "";
  for (const ArchitectureInfo& row : Architectures()) {
    for (const std::string& t : row.config_model_types) {
      if (t == type) return row.name;
    }
  }
  auto archs = config.find("architectures");
  if (archs != config.end() && archs->is_array()) {
    for (const auto& a : *archs) {
      if (!a.is_string()) continue;
      for (const ArchitectureInfo& row : Architectures()) {
        for (const std::string& name : row.config_architectures) {
          if (a == name) return row.name;
        }
      }
    }
  }
  return "";
}

std::string FromKeys(const core::CheckpointIndex& index) {
  for (const NewerDiffusionFamily& f : kNewerDiffusionFamilies) {
    if (HasPrefix(index, f.marker) || HasPrefix(index, std::string(kLdmUnet) + f.marker)) {
      return f.name;
    }
  }
  const core::TensorInfo* in = index.Find(std::string(kLdmUnet) + "input_blocks.0.0.weight");
  const int64_t in_channels =
      in != nullptr && in->shape.size() == 4 ? in->shape[1] : kLdmUnetInChannels;
  if (HasPrefix(index, kSgmEmbedders)) {
    if (HasPrefix(index, kSgmRefinerOpenClip)) return kSdxlRefiner;
    return LdmVariantName("sdxl", kSdxlVariants, in_channels);
  }
  if (HasPrefix(index, kLdmUnet)) {
    // SD2: the OpenCLIP text encoder, or (a file without one) the UNet's 1024-wide context.
    const core::TensorInfo* ctx = index.Find(
        std::string(kLdmUnet) + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight");
    if (HasPrefix(index, kLdmOpenClip) ||
        (ctx != nullptr && ctx->shape.size() == 2 && ctx->shape[1] == 1024)) {
      if (HasPrefix(index, kSd2DepthModel) || in_channels == kSd2DepthUnetInChannels) {
        return kSd2Depth;
      }
      return LdmVariantName("sd2", kSd2Variants, in_channels);
    }
    return LdmVariantName("sd1", kSd1Variants, in_channels);
  }
  if (HasKey(index, "transformer.h.0.attn.c_attn.weight") ||
      HasKey(index, "h.0.attn.c_attn.weight")) {
    return "gpt2";
  }
  if (HasKey(index, "model.layers.0.self_attn.q_proj.weight")) return "llama";
  if (HasKey(index, "layers.0.weight") && !index.tensors.empty()) {
    for (const core::TensorInfo& t : index.tensors) {
      if (!absl::StartsWith(t.name, "layers.")) return "";
    }
    return "mlp";
  }
  return "";
}

}  // namespace

DetectedArchitecture DetectArchitecture(const core::CheckpointIndex& index) {
  if (index.format == core::CheckpointFormat::kTorchScript) return {"torchscript", "format"};
  if (!index.config_json.empty()) {
    std::string name = FromConfig(index.config_json);
    if (!name.empty()) return {name, "config.json"};
  }
  std::string name = FromKeys(index);
  if (!name.empty()) return {name, "keys"};
  return {"", ""};
}

}  // namespace metaload::models
