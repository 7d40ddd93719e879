#include "server/models/architectures.h"

#include <algorithm>

#include "server/models/ldm_layout.h"

namespace metaload::models {

// The synth generators (synth_presets.cc), one per row that has presets.
absl::StatusOr<SynthPlan> MlpSynthPlan(const std::string& name, const std::string& preset);
// GPT2LMHeadModel layout, "transformer." prefix, no lm_head (tied).
absl::StatusOr<SynthPlan> Gpt2SynthPlan(const std::string& name, const std::string& preset);
// LlamaForCausalLM layout with grouped-query attention and an untied lm_head.
absl::StatusOr<SynthPlan> LlamaSynthPlan(const std::string& name, const std::string& preset);
// Stable Diffusion 1.x and 2.x in the LDM layout, one file (ldm_layout.h); a variant's name
// gives the UNet its input channels.
absl::StatusOr<SynthPlan> Sd1SynthPlan(const std::string& name, const std::string& preset);
absl::StatusOr<SynthPlan> Sd2SynthPlan(const std::string& name, const std::string& preset);
// Stable Diffusion XL in sgm's layout, one file; the refiner and inpainting by name.
absl::StatusOr<SynthPlan> SdxlSynthPlan(const std::string& name, const std::string& preset);

namespace {

template <size_t N>
std::vector<ArchitectureVariant> Variants(const LdmVariant (&table)[N]) {
  std::vector<ArchitectureVariant> variants;
  for (const LdmVariant& v : table) variants.push_back({v.name, v.description});
  return variants;
}

std::vector<ArchitectureInfo> Table() {
  std::vector<ArchitectureInfo> rows;
  {
    ArchitectureInfo& a = rows.emplace_back();
    a.name = "mlp";
    a.description = "Linear layers with an activation between them; forward: input -> output";
    a.config_model_types = {"mlp"};
    a.synth_presets = {"tiny", "small", "medium"};
    a.synth = MlpSynthPlan;
  }
  {
    ArchitectureInfo& a = rows.emplace_back();
    a.name = "gpt2";
    a.description = "Hugging Face GPT2LMHeadModel; forward: input_ids [, attention_mask] -> logits";
    a.config_model_types = {"gpt2"};
    a.config_architectures = {"GPT2LMHeadModel"};
    a.synth_presets = {"tiny", "small", "medium"};
    a.synth = Gpt2SynthPlan;
  }
  {
    ArchitectureInfo& a = rows.emplace_back();
    a.name = "llama";
    a.description =
        "Hugging Face LlamaForCausalLM; forward: input_ids [, attention_mask] -> logits";
    a.config_model_types = {"llama"};
    a.config_architectures = {"LlamaForCausalLM"};
    a.synth_presets = {"tiny", "small", "medium"};
    a.synth = LlamaSynthPlan;
  }
  {
    ArchitectureInfo& a = rows.emplace_back();
    a.name = "sd1";
    a.description =
        "Stable Diffusion 1.x single file in the LDM layout; unet, text_encoder, vae_decode, "
        "vae_encode";
    a.variants = Variants(kSd1Variants);
    a.synth_presets = {"tiny", "full"};
    a.synth = Sd1SynthPlan;
  }
  {
    ArchitectureInfo& a = rows.emplace_back();
    a.name = "sd2";
    a.description =
        "Stable Diffusion 2.x single file in the LDM layout (OpenCLIP text encoder, 512-base and "
        "768-v); unet, text_encoder, vae_decode, vae_encode";
    a.variants = Variants(kSd2Variants);
    a.synth_presets = {"tiny", "full"};
    a.synth = Sd2SynthPlan;
  }
  {
    ArchitectureInfo& a = rows.emplace_back();
    a.name = kSd2Depth;
    a.description = "Stable Diffusion 2 depth-to-image (MiDaS depth_model.): detected, not built";
    a.loadable = false;
  }
  {
    ArchitectureInfo& a = rows.emplace_back();
    a.name = "sdxl";
    a.description =
        "Stable Diffusion XL single file in sgm's layout (base: CLIP ViT-L and OpenCLIP bigG); "
        "unet, text_encoder, text_encoder_2, vae_decode, vae_encode";
    a.variants = Variants(kSdxlVariants);
    a.variants.push_back({kSdxlRefiner, "the refiner: OpenCLIP bigG alone, 384-channel UNet"});
    a.synth_presets = {"tiny", "full"};
    a.synth = SdxlSynthPlan;
  }
  for (const char* name : {"sd3", "flux", "stable-cascade"}) {
    ArchitectureInfo& a = rows.emplace_back();
    a.name = name;
    a.description =
        "a diffusion transformer family after SDXL (ldm_layout.h's markers): "
        "detected, not built";
    a.loadable = false;
  }
  {
    ArchitectureInfo& a = rows.emplace_back();
    a.name = "torchscript";
    a.description = "any torch.jit.save archive (runs its code); forward from its schema";
  }
  return rows;
}

}  // namespace

const std::vector<ArchitectureInfo>& Architectures() {
  static const auto* table = new std::vector<ArchitectureInfo>(Table());
  return *table;
}

const ArchitectureInfo* FindArchitecture(absl::string_view name) {
  for (const ArchitectureInfo& a : Architectures()) {
    if (a.name == name) return &a;
    for (const ArchitectureVariant& v : a.variants) {
      if (v.name == name) return &a;
    }
  }
  return nullptr;
}

std::vector<std::string> ArchitectureNames() {
  std::vector<std::string> names;
  for (const ArchitectureInfo& a : Architectures()) {
    if (!a.loadable) continue;
    names.push_back(a.name);
    for (const ArchitectureVariant& v : a.variants) names.push_back(v.name);
  }
  std::sort(names.begin(), names.end());
  return names;
}

std::vector<std::string> SynthArchitectureNames() {
  std::vector<std::string> names;
  for (const ArchitectureInfo& a : Architectures()) {
    if (a.synth == nullptr) continue;
    names.push_back(a.name);
    for (const ArchitectureVariant& v : a.variants) names.push_back(v.name);
  }
  return names;
}

}  // namespace metaload::models
