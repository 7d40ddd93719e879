// sd1: Stable Diffusion 1.x single-file checkpoints (.safetensors or .ckpt) in the original LDM
// layout (ldm_layout.h), the web UI's payload, assembled from the shared parts: the UNet
// (ldm_unet.h), the AutoencoderKL (ldm_vae.h) and the CLIP text encoder (clip_text_encoder.h),
// each sized from the checkpoint's keys (ldm_keys.h), plus the DDPM schedule buffers when
// present. CLIP keys without "text_model." (older checkpoints) are mapped.
//
// The variants the web UI knows by their UNet input channels (ldm_layout.h: 9 inpainting, 8
// instruct-pix2pix) load the same way and are named by them. Keys outside the networks
// (model_ema.*, optimizer state) are reported as unexpected, not errors.
#include <ATen/ATen.h>

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "server/models/clip_text_encoder.h"
#include "server/models/ldm_keys.h"
#include "server/models/ldm_layout.h"
#include "server/models/ldm_unet.h"
#include "server/models/ldm_vae.h"
#include "server/models/meta_module_model.h"

namespace metaload::models {
namespace {

// Everything the keys told about the checkpoint.
struct Sd1Parts {
  UnetConfig unet;
  VaeConfig vae;
  ClipConfig clip;
  std::vector<std::pair<std::string, int64_t>> schedule;  // buffer name, steps
  std::vector<int64_t> position_ids;  // shape of CLIP's position_ids buffer; empty: none
  bool short_clip_keys = false;       // CLIP under kLdmClipShort
};

// The checkpoint's module tree, under the LDM names.
class Sd1Module : public core::Module {
 public:
  explicit Sd1Module(const Sd1Parts& p)
      : unet(AddChild("model.diffusion_model", std::make_unique<Unet>(p.unet))),
        vae(AddChild("first_stage_model", std::make_unique<Vae>(p.vae))),
        clip(AddChild("cond_stage_model.transformer.text_model",
                      std::make_unique<ClipTextEncoder>(p.clip, p.position_ids))) {
    for (const auto& [name, steps] : p.schedule) AddBuffer(name, {steps}, nullptr);
  }
  const Unet& unet;
  const Vae& vae;
  const ClipTextEncoder& clip;
};

using Inputs = std::map<std::string, at::Tensor>;

class Sd1 : public MetaModuleModel {
 public:
  Sd1(std::string name, const Sd1Parts& parts)
      : name_(std::move(name)), net_(BuildModule<Sd1Module>(parts)) {
    if (parts.short_clip_keys) {
      SetKeyMap([](const std::string& key) {
        return absl::StartsWith(key, kLdmClip)
                   ? absl::StrCat(kLdmClipShort, key.substr(sizeof(kLdmClip) - 1))
                   : key;
      });
    }
  }

  std::string architecture() const override { return name_; }

  std::vector<EntrySpec> Entries() const override {
    std::vector<EntrySpec> specs;
    for (const Entry& e : kEntries) {
      specs.push_back((this->*e.spec)());
      specs.back().name = e.name;
    }
    return specs;
  }

  // The web UI's: networks in float16, the VAE and alphas_cumprod as stored.
  DtypeChoice DefaultDtypes() const override {
    return {"float16", {{kLdmVae, "keep"}, {"alphas_cumprod", "keep"}}};
  }

 protected:
  std::string EntryPrefix(const std::string& entry) const override {
    const Entry* e = Find(entry);
    return e != nullptr ? e->network : "";
  }

  absl::StatusOr<NamedTensors> Forward(const std::string& entry,
                                       const Inputs& inputs) const override {
    const Entry* e = Find(entry);  // Run checked the name against Entries()
    if (e == nullptr) return absl::InternalError(absl::StrCat("sd1: no entry '", entry, "'"));
    return (this->*e->run)(inputs);
  }

 private:
  // One entry: its name, the module prefix of the network it runs (entries of one network
  // compute in one dtype), its inputs and outputs, and what it does.
  struct Entry {
    const char* name;
    const char* network;
    EntrySpec (Sd1::*spec)() const;
    absl::StatusOr<NamedTensors> (Sd1::*run)(const Inputs& inputs) const;
  };
  static const Entry kEntries[4];

  static const Entry* Find(const std::string& name) {
    for (const Entry& e : kEntries) {
      if (name == e.name) return &e;
    }
    return nullptr;
  }

  const UnetConfig& unet() const { return net_.unet.config(); }
  const VaeConfig& vae() const { return net_.vae.config(); }
  const ClipConfig& clip() const { return net_.clip.config(); }

  EntrySpec UnetSpec() const {
    return {"",
            {{"x", std::nullopt, {-1, unet().in_channels, -1, -1}},
             {"timesteps", core::DType::kInt64, {-1}},
             {"context", std::nullopt, {-1, -1, unet().context_dim}}},
            {{"eps", std::nullopt, {-1, unet().out_channels, -1, -1}}}};
  }
  absl::StatusOr<NamedTensors> RunUnet(const Inputs& inputs) const {
    const at::Tensor& x = inputs.at("x");
    const at::Tensor& t = inputs.at("timesteps");
    const at::Tensor& context = inputs.at("context");
    if (t.size(0) != x.size(0) || context.size(0) != x.size(0)) {
      return absl::InvalidArgumentError(absl::StrCat("unet: batch sizes differ (x ", x.size(0),
                                                     ", timesteps ", t.size(0), ", context ",
                                                     context.size(0), ")"));
    }
    const int64_t downscale = unet().Downscale();
    if (x.size(2) % downscale != 0 || x.size(3) % downscale != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("unet: x height and width must be multiples of ", downscale, ", got ",
                       x.size(2), "x", x.size(3)));
    }
    return NamedTensors{{"eps", net_.unet.Forward(x, t, context)}};
  }

  EntrySpec TextEncoderSpec() const {
    return {"",
            {{"input_ids", core::DType::kInt64, {-1, -1}}},
            {{"last_hidden_state", std::nullopt, {-1, -1, clip().width}}}};
  }
  absl::StatusOr<NamedTensors> RunTextEncoder(const Inputs& inputs) const {
    const at::Tensor& ids = inputs.at("input_ids");
    if (ids.size(1) > clip().positions) {
      return absl::InvalidArgumentError(absl::StrCat("text_encoder: input_ids has ", ids.size(1),
                                                     " tokens, more than ", clip().positions));
    }
    if (ids.numel() > 0 &&
        (ids.min().item<int64_t>() < 0 || ids.max().item<int64_t>() >= clip().vocab)) {
      return absl::InvalidArgumentError(
          absl::StrCat("text_encoder: input_ids must be in [0, ", clip().vocab, ")"));
    }
    return NamedTensors{{"last_hidden_state", net_.clip.Forward(ids)}};
  }

  EntrySpec VaeDecodeSpec() const {
    return {"",
            {{"latents", std::nullopt, {-1, vae().embed_dim, -1, -1}}},
            {{"image", std::nullopt, {-1, vae().out_channels, -1, -1}}}};
  }
  absl::StatusOr<NamedTensors> RunVaeDecode(const Inputs& inputs) const {
    return NamedTensors{{"image", net_.vae.Decode(inputs.at("latents"))}};
  }

  EntrySpec VaeEncodeSpec() const {
    return {"",
            {{"image", std::nullopt, {-1, vae().in_channels, -1, -1}}},
            {{"latent_mean", std::nullopt, {-1, vae().embed_dim, -1, -1}}}};
  }
  absl::StatusOr<NamedTensors> RunVaeEncode(const Inputs& inputs) const {
    return NamedTensors{{"latent_mean", net_.vae.Encode(inputs.at("image"))}};
  }

  std::string name_;
  const Sd1Module& net_;
};

// The first is the default entry.
const Sd1::Entry Sd1::kEntries[4] = {
    {"unet", kLdmUnet, &Sd1::UnetSpec, &Sd1::RunUnet},
    {"text_encoder", kLdmTextEncoders, &Sd1::TextEncoderSpec, &Sd1::RunTextEncoder},
    {"vae_decode", kLdmVae, &Sd1::VaeDecodeSpec, &Sd1::RunVaeDecode},
    {"vae_encode", kLdmVae, &Sd1::VaeEncodeSpec, &Sd1::RunVaeEncode},
};

}  // namespace

absl::StatusOr<std::unique_ptr<Model>> BuildSd1(const core::CheckpointIndex& index) {
  const LdmKeys keys{index, "sd1"};
  Sd1Parts parts;
  absl::StatusOr<UnetConfig> unet = ReadUnet(keys, kLdmUnet);
  if (!unet.ok()) return unet.status();
  parts.unet = *std::move(unet);
  absl::StatusOr<VaeConfig> vae = ReadVae(keys, kLdmVae);
  if (!vae.ok()) return vae.status();
  parts.vae = *std::move(vae);
  parts.short_clip_keys = !HasKeyPrefix(index, kLdmClip);
  const std::string clip_prefix = parts.short_clip_keys ? kLdmClipShort : kLdmClip;
  absl::StatusOr<ClipConfig> clip = ReadClip(keys, clip_prefix);
  if (!clip.ok()) return clip.status();
  parts.clip = *clip;
  if (parts.clip.width != parts.unet.context_dim) {
    return NotLdmLayout(keys, absl::StrCat("CLIP width ", parts.clip.width, " but UNet context ",
                                           parts.unet.context_dim));
  }
  for (const char* name : kLdmScheduleBuffers) {
    const core::TensorInfo* t = index.Find(name);
    if (t != nullptr && t->shape.size() == 1) parts.schedule.emplace_back(name, t->shape[0]);
  }
  const core::TensorInfo* ids = index.Find(clip_prefix + "embeddings.position_ids");
  if (ids != nullptr) parts.position_ids = ids->shape;
  return std::unique_ptr<Model>(new Sd1(Sd1VariantName(parts.unet.in_channels), parts));
}

}  // namespace metaload::models
