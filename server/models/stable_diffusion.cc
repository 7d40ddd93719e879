// sd1, sd2 and sdxl: Stable Diffusion 1.x, 2.x and XL single-file checkpoints (.safetensors or
// .ckpt), the web UI's payload, in the original LDM layout (SD1, SD2) or sgm's (SDXL), names in
// ldm_layout.h. One assembler over the shared parts: the UNet (ldm_unet.h), the AutoencoderKL
// (ldm_vae.h) and the text encoders, CLIP ViT-L/14 (clip_text_encoder.h: SD1's, and SDXL's
// first) and OpenCLIP (open_clip_text_encoder.h: SD2's ViT-H/14, SDXL's bigG), each sized from
// the checkpoint's keys (ldm_keys.h), plus the DDPM schedule buffers when present. SD1's CLIP
// keys without "text_model." (older checkpoints) are mapped.
//
// What the keys cannot tell is stated here, from the original configs: the UNet's heads (SD1's
// v1-inference.yaml: num_heads 8; SD2's v2-inference*.yaml and sgm's sd_xl_*.yaml:
// num_head_channels 64) and what SD2's UNet predicts (512-base: the noise; 768-v: v, from
// identical shapes). SD2's prediction is read as ComfyUI reads it: the population std of the
// last output block's first norm1 bias, above 0.09 in v-prediction files; inpainting UNets
// predict the noise; SDXL predicts the noise unless a v_pred key says otherwise. A request's
// `prediction` always wins (the cache applies it).
//
// The variants the web UI knows by their UNet input channels (ldm_layout.h: 9 inpainting, 8
// instruct-pix2pix) load the same way and are named by them; the SDXL refiner by its keys. Keys
// outside the networks (model_ema.*, optimizer state) are reported as unexpected, not errors.
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
#include "server/models/open_clip_text_encoder.h"

namespace metaload::models {
namespace {

// Everything the keys told about the checkpoint: one text encoder or (SDXL base) both.
struct LdmParts {
  std::string family;  // "sd1", "sd2", "sdxl"
  UnetConfig unet;
  VaeConfig vae;
  std::optional<ClipConfig> clip;           // SD1, SDXL base
  std::optional<OpenClipConfig> open_clip;  // SD2, SDXL
  std::string clip_prefix = kLdmClip;       // where each sits (ldm_layout.h)
  std::string open_clip_prefix = kLdmOpenClip;
  std::vector<std::pair<std::string, int64_t>> schedule;  // buffer name, steps
  std::vector<int64_t> position_ids;  // shape of CLIP's position_ids buffer; empty: none
  bool short_clip_keys = false;       // CLIP under kLdmClipShort
};

// A prefix as a module name: "first_stage_model." -> "first_stage_model".
std::string ModuleName(std::string prefix) {
  prefix.pop_back();
  return prefix;
}

// "conditioner.embedders.1.model." -> "conditioner.embedders.1.": the network an SDXL text
// encoder's entry names for its dtypes.
std::string EmbedderNetwork(const std::string& prefix) {
  const size_t end = prefix.find('.', sizeof(kSgmEmbedders) - 1);
  return prefix.substr(0, end + 1);
}

// The checkpoint's module tree, under the LDM names.
class LdmModule : public core::Module {
 public:
  explicit LdmModule(const LdmParts& p)
      : unet(AddChild(ModuleName(kLdmUnet), std::make_unique<Unet>(p.unet))),
        vae(AddChild(ModuleName(kLdmVae), std::make_unique<Vae>(p.vae))) {
    if (p.clip) {
      clip = &AddChild(ModuleName(p.clip_prefix),
                       std::make_unique<ClipTextEncoder>(*p.clip, p.position_ids));
    }
    if (p.open_clip) {
      open_clip = &AddChild(ModuleName(p.open_clip_prefix),
                            std::make_unique<OpenClipTextEncoder>(*p.open_clip));
    }
    for (const auto& [name, steps] : p.schedule) AddBuffer(name, {steps}, nullptr);
  }
  const Unet& unet;
  const Vae& vae;
  const ClipTextEncoder* clip = nullptr;
  const OpenClipTextEncoder* open_clip = nullptr;
};

using Inputs = std::map<std::string, at::Tensor>;

class StableDiffusion : public MetaModuleModel {
 public:
  StableDiffusion(std::string name, const LdmParts& parts, DiffusionInfo diffusion)
      : name_(std::move(name)),
        family_(parts.family),
        unet_output_(family_ == "sd1" ? "eps" : "model_output"),
        net_(BuildModule<LdmModule>(parts)),
        diffusion_(std::move(diffusion)) {
    entries_.push_back({"unet", kLdmUnet, &StableDiffusion::UnetSpec, &StableDiffusion::RunUnet});
    if (family_ != "sdxl") {
      entries_.push_back({"text_encoder", kLdmTextEncoders, &StableDiffusion::TextEncoderSpec,
                          &StableDiffusion::RunTextEncoder});
    } else {
      if (parts.clip) {
        entries_.push_back({"text_encoder", EmbedderNetwork(parts.clip_prefix),
                            &StableDiffusion::ClipHiddenSpec, &StableDiffusion::RunClipHidden});
      }
      entries_.push_back({"text_encoder_2", EmbedderNetwork(parts.open_clip_prefix),
                          &StableDiffusion::BigGSpec, &StableDiffusion::RunBigG});
    }
    entries_.push_back(
        {"vae_decode", kLdmVae, &StableDiffusion::VaeDecodeSpec, &StableDiffusion::RunVaeDecode});
    entries_.push_back(
        {"vae_encode", kLdmVae, &StableDiffusion::VaeEncodeSpec, &StableDiffusion::RunVaeEncode});
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
    for (const Entry& e : entries_) {
      specs.push_back((this->*e.spec)());
      specs.back().name = e.name;
    }
    return specs;
  }

  // The web UI's: networks in float16, the VAE and alphas_cumprod as stored; SDXL's VAE in
  // float32, since it overflows in float16 (the web UI's --no-half-vae).
  DtypeChoice DefaultDtypes() const override {
    return {"float16",
            {{kLdmVae, family_ == "sdxl" ? "float32" : "keep"}, {"alphas_cumprod", "keep"}}};
  }

  absl::StatusOr<core::LoadReport> Load(const core::CheckpointSource& source,
                                        core::LoadOptions options,
                                        const ComputeChoice& compute) override {
    absl::StatusOr<core::LoadReport> report = MetaModuleModel::Load(source, options, compute);
    if (report.ok() && diffusion_.prediction.empty()) ReadPrediction();
    return report;
  }

  std::optional<DiffusionInfo> Diffusion() const override { return diffusion_; }

 protected:
  std::string EntryPrefix(const std::string& entry) const override {
    const Entry* e = Find(entry);
    return e != nullptr ? e->network : std::string();
  }

  absl::StatusOr<NamedTensors> Forward(const std::string& entry,
                                       const Inputs& inputs) const override {
    const Entry* e = Find(entry);  // Run checked the name against Entries()
    if (e == nullptr) return absl::InternalError(absl::StrCat(name_, ": no entry '", entry, "'"));
    return (this->*e->run)(inputs);
  }

 private:
  // One entry: its name, the module prefix of the network it runs (entries of one network
  // compute in one dtype), its inputs and outputs, and what it does.
  struct Entry {
    const char* name;
    std::string network;
    EntrySpec (StableDiffusion::*spec)() const;
    absl::StatusOr<NamedTensors> (StableDiffusion::*run)(const Inputs& inputs) const;
  };

  const Entry* Find(const std::string& name) const {
    for (const Entry& e : entries_) {
      if (name == e.name) return &e;
    }
    return nullptr;
  }

  // SD2's prediction from the loaded weights (the file header says why this statistic).
  void ReadPrediction() {
    const UnetConfig& u = unet();
    const std::string key =
        absl::StrCat(kLdmUnet, "output_blocks.", u.mult.size() * (u.res_blocks + 1) - 1,
                     ".1.transformer_blocks.0.norm1.bias");
    diffusion_.prediction = "epsilon";
    diffusion_.prediction_source = absl::StrCat("weights: no ", key, "; epsilon assumed");
    for (const core::TensorSlot& slot : module().Slots()) {
      if (slot.name != key) continue;
      const double std = slot.tensor->to(at::kFloat).std(/*unbiased=*/false).item<double>();
      const bool v = std > kVPredictionStd;
      diffusion_.prediction = v ? "v" : "epsilon";
      diffusion_.prediction_source =
          absl::StrCat("weights: std of ", key, " = ", std, v ? " > " : " <= ", kVPredictionStd);
    }
  }
  static constexpr double kVPredictionStd = 0.09;

  const UnetConfig& unet() const { return net_.unet.config(); }
  const VaeConfig& vae() const { return net_.vae.config(); }

  // What SD1's or SD2's text_encoder takes and gives (CLIP or OpenCLIP; SDXL's two encoders
  // have their own specs).
  struct TextShape {
    int64_t vocab, positions, width;
  };
  TextShape text() const {
    if (net_.clip != nullptr) {
      const ClipConfig& c = net_.clip->config();
      return {c.vocab, c.positions, c.width};
    }
    const OpenClipConfig& c = net_.open_clip->config();
    return {c.vocab, c.positions, c.width};
  }

  EntrySpec UnetSpec() const {
    EntrySpec spec{"",
                   {{"x", std::nullopt, {-1, unet().in_channels, -1, -1}},
                    {"timesteps", core::DType::kInt64, {-1}},
                    {"context", std::nullopt, {-1, -1, unet().context_dim}}},
                   {{unet_output_, std::nullopt, {-1, unet().out_channels, -1, -1}}}};
    // SDXL: the pooled bigG embedding and the Fourier-embedded size and crop conditions.
    if (unet().adm_in_channels > 0) {
      spec.inputs.push_back({"y", std::nullopt, {-1, unet().adm_in_channels}});
    }
    return spec;
  }
  absl::StatusOr<NamedTensors> RunUnet(const Inputs& inputs) const {
    const at::Tensor& x = inputs.at("x");
    const at::Tensor& t = inputs.at("timesteps");
    const at::Tensor& context = inputs.at("context");
    const at::Tensor y = unet().adm_in_channels > 0 ? inputs.at("y") : at::Tensor();
    if (t.size(0) != x.size(0) || context.size(0) != x.size(0) ||
        (y.defined() && y.size(0) != x.size(0))) {
      return absl::InvalidArgumentError(absl::StrCat(
          "unet: batch sizes differ (x ", x.size(0), ", timesteps ", t.size(0), ", context ",
          context.size(0), y.defined() ? absl::StrCat(", y ", y.size(0)) : "", ")"));
    }
    const int64_t downscale = unet().Downscale();
    if (x.size(2) % downscale != 0 || x.size(3) % downscale != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("unet: x height and width must be multiples of ", downscale, ", got ",
                       x.size(2), "x", x.size(3)));
    }
    return NamedTensors{{unet_output_, net_.unet.Forward(x, t, context, y)}};
  }

  EntrySpec TextEncoderSpec() const {
    return {"",
            {{"input_ids", core::DType::kInt64, {-1, -1}}},
            {{"last_hidden_state", std::nullopt, {-1, -1, text().width}}}};
  }
  // INVALID_ARGUMENT unless `ids` fit the text encoder `shape` of `entry`.
  static absl::Status CheckIds(const char* entry, const at::Tensor& ids, const TextShape& shape) {
    if (ids.size(1) > shape.positions) {
      return absl::InvalidArgumentError(absl::StrCat(entry, ": input_ids has ", ids.size(1),
                                                     " tokens, more than ", shape.positions));
    }
    if (ids.numel() > 0 &&
        (ids.min().item<int64_t>() < 0 || ids.max().item<int64_t>() >= shape.vocab)) {
      return absl::InvalidArgumentError(
          absl::StrCat(entry, ": input_ids must be in [0, ", shape.vocab, ")"));
    }
    return absl::OkStatus();
  }
  absl::StatusOr<NamedTensors> RunTextEncoder(const Inputs& inputs) const {
    const at::Tensor& ids = inputs.at("input_ids");
    if (absl::Status s = CheckIds("text_encoder", ids, text()); !s.ok()) return s;
    return NamedTensors{{"last_hidden_state", net_.clip != nullptr ? net_.clip->Forward(ids)
                                                                   : net_.open_clip->Forward(ids)}};
  }

  // SDXL's CLIP ViT-L: hidden_states[-2], no final layer norm.
  EntrySpec ClipHiddenSpec() const {
    return {"",
            {{"input_ids", core::DType::kInt64, {-1, -1}}},
            {{"penultimate_hidden_state", std::nullopt, {-1, -1, net_.clip->config().width}}}};
  }
  absl::StatusOr<NamedTensors> RunClipHidden(const Inputs& inputs) const {
    const at::Tensor& ids = inputs.at("input_ids");
    const ClipConfig& c = net_.clip->config();
    if (absl::Status s = CheckIds("text_encoder", ids, {c.vocab, c.positions, c.width}); !s.ok()) {
      return s;
    }
    return NamedTensors{{"penultimate_hidden_state", net_.clip->HiddenStates(ids, c.layers - 1)}};
  }

  // SDXL's OpenCLIP bigG: the penultimate hidden states and the pooled, projected output.
  EntrySpec BigGSpec() const {
    const OpenClipConfig& c = net_.open_clip->config();
    return {"",
            {{"input_ids", core::DType::kInt64, {-1, -1}}},
            {{"penultimate_hidden_state", std::nullopt, {-1, -1, c.width}},
             {"pooled", std::nullopt, {-1, c.projection}}}};
  }
  absl::StatusOr<NamedTensors> RunBigG(const Inputs& inputs) const {
    const at::Tensor& ids = inputs.at("input_ids");
    const OpenClipConfig& c = net_.open_clip->config();
    if (absl::Status s = CheckIds("text_encoder_2", ids, {c.vocab, c.positions, c.width});
        !s.ok()) {
      return s;
    }
    OpenClipTextEncoder::SdxlOutputs out = net_.open_clip->ForwardSdxl(ids);
    return NamedTensors{{"penultimate_hidden_state", out.penultimate}, {"pooled", out.pooled}};
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
  std::string family_;
  // SD1's UNet output is the noise, "eps"; SD2's and SDXL's may be v, so it has the neutral name
  // ldm gives it (ddpm.py's model_output) and ModelInfo says which (Diffusion()).
  const char* unet_output_;
  const LdmModule& net_;
  DiffusionInfo diffusion_;     // the prediction from the builder, or read by Load
  std::vector<Entry> entries_;  // the first is the default entry
};

// The UNet, the VAE and the schedule, read alike for both families.
absl::Status ReadCommonParts(const LdmKeys& keys, LdmParts* parts) {
  absl::StatusOr<UnetConfig> unet = ReadUnet(keys, kLdmUnet);
  if (!unet.ok()) return unet.status();
  parts->unet = *std::move(unet);
  absl::StatusOr<VaeConfig> vae = ReadVae(keys, kLdmVae);
  if (!vae.ok()) return vae.status();
  parts->vae = *std::move(vae);
  for (const char* name : kLdmScheduleBuffers) {
    const core::TensorInfo* t = keys.index.Find(name);
    if (t != nullptr && t->shape.size() == 1) parts->schedule.emplace_back(name, t->shape[0]);
  }
  return absl::OkStatus();
}

absl::Status CheckContext(const LdmKeys& keys, const LdmParts& parts, int64_t text_width) {
  if (text_width == parts.unet.context_dim) return absl::OkStatus();
  return NotLdmLayout(keys, absl::StrCat("text encoder width ", text_width, " but UNet context ",
                                         parts.unet.context_dim));
}

// With heads of head_channels, every level's width must hold whole heads.
absl::Status CheckHeads(const LdmKeys& keys, const UnetConfig& unet) {
  for (int64_t m : unet.mult) {
    if (m * unet.model_channels % unet.head_channels != 0) {
      return NotLdmLayout(keys, absl::StrCat("UNet level width not a multiple of ",
                                             unet.head_channels, "-channel heads"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<Model>> BuildSd1(const core::CheckpointIndex& index) {
  const LdmKeys keys{index, "sd1"};
  LdmParts parts;
  parts.family = "sd1";
  if (absl::Status s = ReadCommonParts(keys, &parts); !s.ok()) return s;
  parts.unet.heads = 8;  // v1-inference.yaml's num_heads
  parts.short_clip_keys = !HasKeyPrefix(index, kLdmClip);
  const std::string clip_prefix = parts.short_clip_keys ? kLdmClipShort : kLdmClip;
  absl::StatusOr<ClipConfig> clip = ReadClip(keys, clip_prefix);
  if (!clip.ok()) return clip.status();
  parts.clip = *clip;
  if (absl::Status s = CheckContext(keys, parts, clip->width); !s.ok()) return s;
  const core::TensorInfo* ids = index.Find(clip_prefix + "embeddings.position_ids");
  if (ids != nullptr) parts.position_ids = ids->shape;
  return std::unique_ptr<Model>(
      new StableDiffusion(LdmVariantName("sd1", kSd1Variants, parts.unet.in_channels), parts,
                          {"epsilon", "architecture: SD1 predicts the noise", kSd1VaeScaleFactor}));
}

absl::StatusOr<std::unique_ptr<Model>> BuildSd2(const core::CheckpointIndex& index) {
  const LdmKeys keys{index, "sd2"};
  LdmParts parts;
  parts.family = "sd2";
  if (absl::Status s = ReadCommonParts(keys, &parts); !s.ok()) return s;
  parts.unet.head_channels = 64;  // v2-inference*.yaml's num_head_channels
  absl::StatusOr<OpenClipConfig> open_clip = ReadOpenClip(keys, kLdmOpenClip);
  if (!open_clip.ok()) return open_clip.status();
  parts.open_clip = *open_clip;
  if (absl::Status s = CheckContext(keys, parts, open_clip->width); !s.ok()) return s;
  if (absl::Status s = CheckHeads(keys, parts.unet); !s.ok()) return s;
  DiffusionInfo diffusion{"", "", kSd1VaeScaleFactor};  // 512-base or 768-v: read by Load
  if (parts.unet.in_channels != kLdmUnetInChannels) {
    diffusion.prediction = "epsilon";
    diffusion.prediction_source = "architecture: SD2 inpainting predicts the noise";
  }
  return std::unique_ptr<Model>(new StableDiffusion(
      LdmVariantName("sd2", kSd2Variants, parts.unet.in_channels), parts, diffusion));
}

absl::StatusOr<std::unique_ptr<Model>> BuildSdxl(const core::CheckpointIndex& index) {
  const LdmKeys keys{index, "sdxl"};
  LdmParts parts;
  parts.family = "sdxl";
  if (absl::Status s = ReadCommonParts(keys, &parts); !s.ok()) return s;
  parts.unet.head_channels = 64;  // sgm's sd_xl_base.yaml / sd_xl_refiner.yaml
  if (absl::Status s = CheckHeads(keys, parts.unet); !s.ok()) return s;
  if (parts.unet.adm_in_channels == 0) return NotLdmLayout(keys, "a UNet without label_emb");
  const bool refiner = HasKeyPrefix(index, kSgmRefinerOpenClip);
  int64_t text_width = 0;
  if (!refiner) {
    parts.clip_prefix = kSgmClip;
    absl::StatusOr<ClipConfig> clip = ReadClip(keys, kSgmClip);
    if (!clip.ok()) return clip.status();
    if (clip->layers < 2) return NotLdmLayout(keys, "CLIP needs two layers for its penultimate");
    parts.clip = *clip;
    text_width += clip->width;
    const core::TensorInfo* ids = index.Find(std::string(kSgmClip) + "embeddings.position_ids");
    if (ids != nullptr) parts.position_ids = ids->shape;
  }
  parts.open_clip_prefix = refiner ? kSgmRefinerOpenClip : kSgmOpenClip;
  absl::StatusOr<OpenClipConfig> open_clip = ReadOpenClip(keys, parts.open_clip_prefix);
  if (!open_clip.ok()) return open_clip.status();
  // The pooled output runs every resblock: a file without bigG's last cannot give it.
  if (open_clip->output_layer == open_clip->layers || open_clip->projection == 0) {
    return NotLdmLayout(keys, "OpenCLIP bigG without its last resblock or text_projection");
  }
  parts.open_clip = *open_clip;
  text_width += open_clip->width;
  // The UNet's context is the two encoders' hidden states side by side (base: 768 + 1280).
  if (absl::Status s = CheckContext(keys, parts, text_width); !s.ok()) return s;
  DiffusionInfo diffusion{"epsilon", "architecture: SDXL predicts the noise", kSdxlVaeScaleFactor};
  if (index.Find(kSdxlVPredictionKey) != nullptr) {
    diffusion.prediction = "v";
    diffusion.prediction_source = absl::StrCat("keys: ", kSdxlVPredictionKey);
  }
  const std::string name =
      refiner ? kSdxlRefiner : LdmVariantName("sdxl", kSdxlVariants, parts.unet.in_channels);
  return std::unique_ptr<Model>(new StableDiffusion(name, parts, diffusion));
}

}  // namespace metaload::models
