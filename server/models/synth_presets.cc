#include "server/models/synth_presets.h"

#include <cmath>

#include "absl/strings/str_cat.h"
#include "server/models/ldm_layout.h"

namespace metaload::models {
namespace {

double InvSqrt(int64_t n) { return 1.0 / std::sqrt(static_cast<double>(n)); }

// Synthesize checks the preset against the table first: another one here means the table row
// and its generator disagree.
absl::Status NoSuchPreset(const std::string& name, const std::string& preset) {
  return absl::InternalError(
      absl::StrCat("synth: the ", name, " generator has no preset '", preset, "'"));
}

}  // namespace

// Linear layers "layers.{i}" with config.json's layer_sizes; tiny 7 KB, medium ~200 MB.
absl::StatusOr<SynthPlan> MlpSynthPlan(const std::string& name, const std::string& preset) {
  std::vector<int64_t> sizes;
  if (preset == "tiny") {
    sizes = {16, 32, 32, 8};
  } else if (preset == "small") {
    sizes = {256, 1024, 1024, 256};
  } else if (preset == "medium") {
    sizes = {1024, 4096, 4096, 4096, 1024};
  } else {
    return NoSuchPreset(name, preset);
  }
  SynthPlan p;
  for (size_t i = 0; i + 1 < sizes.size(); ++i) {
    const int64_t in = sizes[i], out = sizes[i + 1];
    p.tensors.push_back({absl::StrCat("layers.", i, ".weight"), {out, in}, InvSqrt(in)});
    p.tensors.push_back({absl::StrCat("layers.", i, ".bias"), {out}, InvSqrt(in)});
  }
  p.config = {{"model_type", "mlp"},
              {"architectures", {"MLP"}},
              {"layer_sizes", sizes},
              {"activation", "gelu"}};
  return p;
}

// GPT2LMHeadModel layout, "transformer." prefix, no lm_head (tied); medium has GPT-2 medium's
// shapes.
absl::StatusOr<SynthPlan> Gpt2SynthPlan(const std::string& name, const std::string& preset) {
  int64_t n, layers, heads, positions, vocab;
  if (preset == "tiny") {
    n = 32, layers = 2, heads = 4, positions = 64, vocab = 128;
  } else if (preset == "small") {
    n = 256, layers = 4, heads = 4, positions = 256, vocab = 4096;
  } else if (preset == "medium") {
    n = 1024, layers = 24, heads = 16, positions = 1024, vocab = 50257;
  } else {
    return NoSuchPreset(name, preset);
  }
  SynthPlan p;
  p.config = {{"model_type", "gpt2"},
              {"architectures", {"GPT2LMHeadModel"}},
              {"n_embd", n},
              {"n_layer", layers},
              {"n_head", heads},
              {"n_positions", positions},
              {"n_ctx", positions},
              {"vocab_size", vocab},
              {"layer_norm_epsilon", 1e-5},
              {"activation_function", "gelu_new"}};
  const std::string t = "transformer.";
  p.tensors.push_back({t + "wte.weight", {vocab, n}, 0.5});
  p.tensors.push_back({t + "wpe.weight", {positions, n}, 0.1});
  for (int64_t i = 0; i < layers; ++i) {
    const std::string h = absl::StrCat(t, "h.", i, ".");
    p.tensors.push_back({h + "ln_1.weight", {n}, 0.1, 1.0});
    p.tensors.push_back({h + "ln_1.bias", {n}, 0.1});
    p.tensors.push_back({h + "attn.c_attn.weight", {n, 3 * n}, InvSqrt(n)});
    p.tensors.push_back({h + "attn.c_attn.bias", {3 * n}, 0.1});
    p.tensors.push_back({h + "attn.c_proj.weight", {n, n}, InvSqrt(n)});
    p.tensors.push_back({h + "attn.c_proj.bias", {n}, 0.1});
    p.tensors.push_back({h + "ln_2.weight", {n}, 0.1, 1.0});
    p.tensors.push_back({h + "ln_2.bias", {n}, 0.1});
    p.tensors.push_back({h + "mlp.c_fc.weight", {n, 4 * n}, InvSqrt(n)});
    p.tensors.push_back({h + "mlp.c_fc.bias", {4 * n}, 0.1});
    p.tensors.push_back({h + "mlp.c_proj.weight", {4 * n, n}, InvSqrt(4 * n)});
    p.tensors.push_back({h + "mlp.c_proj.bias", {n}, 0.1});
  }
  p.tensors.push_back({t + "ln_f.weight", {n}, 0.1, 1.0});
  p.tensors.push_back({t + "ln_f.bias", {n}, 0.1});
  return p;
}

// LlamaForCausalLM layout with grouped-query attention and an untied lm_head.
absl::StatusOr<SynthPlan> LlamaSynthPlan(const std::string& name, const std::string& preset) {
  int64_t hidden, inter, layers, heads, kv, vocab, positions;
  if (preset == "tiny") {
    hidden = 32, inter = 64, layers = 2, heads = 4, kv = 2, vocab = 128, positions = 64;
  } else if (preset == "small") {
    hidden = 256, inter = 688, layers = 4, heads = 8, kv = 4, vocab = 4096, positions = 256;
  } else if (preset == "medium") {
    hidden = 1024, inter = 2816, layers = 16, heads = 16, kv = 8, vocab = 32000, positions = 2048;
  } else {
    return NoSuchPreset(name, preset);
  }
  SynthPlan p;
  p.config = {{"model_type", "llama"},       {"architectures", {"LlamaForCausalLM"}},
              {"hidden_size", hidden},       {"intermediate_size", inter},
              {"num_hidden_layers", layers}, {"num_attention_heads", heads},
              {"num_key_value_heads", kv},   {"rms_norm_eps", 1e-6},
              {"rope_theta", 10000.0},       {"max_position_embeddings", positions},
              {"vocab_size", vocab},         {"tie_word_embeddings", false}};
  const int64_t kv_dim = hidden / heads * kv;
  p.tensors.push_back({"model.embed_tokens.weight", {vocab, hidden}, 0.5});
  for (int64_t i = 0; i < layers; ++i) {
    const std::string l = absl::StrCat("model.layers.", i, ".");
    p.tensors.push_back({l + "input_layernorm.weight", {hidden}, 0.1, 1.0});
    p.tensors.push_back({l + "self_attn.q_proj.weight", {hidden, hidden}, InvSqrt(hidden)});
    p.tensors.push_back({l + "self_attn.k_proj.weight", {kv_dim, hidden}, InvSqrt(hidden)});
    p.tensors.push_back({l + "self_attn.v_proj.weight", {kv_dim, hidden}, InvSqrt(hidden)});
    p.tensors.push_back({l + "self_attn.o_proj.weight", {hidden, hidden}, InvSqrt(hidden)});
    p.tensors.push_back({l + "post_attention_layernorm.weight", {hidden}, 0.1, 1.0});
    p.tensors.push_back({l + "mlp.gate_proj.weight", {inter, hidden}, InvSqrt(hidden)});
    p.tensors.push_back({l + "mlp.up_proj.weight", {inter, hidden}, InvSqrt(hidden)});
    p.tensors.push_back({l + "mlp.down_proj.weight", {hidden, inter}, InvSqrt(inter)});
  }
  p.tensors.push_back({"model.norm.weight", {hidden}, 0.1, 1.0});
  p.tensors.push_back({"lm_head.weight", {vocab, hidden}, InvSqrt(hidden)});
  return p;
}

namespace {

// The LDM single-file networks' tensors, in the names ldm_layout.h and the parts' headers give.
class LdmSynth {
 public:
  struct UnetShape {
    int64_t in_channels, model_channels, res_blocks, context;
    std::vector<int64_t> mult;
    std::vector<int64_t> depth;  // per level: transformer blocks, 0 = no attention
    int64_t middle_depth;
    bool linear_proj;
    int64_t adm_in_channels = 0;  // SDXL's label_emb
  };
  struct VaeShape {
    int64_t ch, res_blocks;
    std::vector<int64_t> mult;
  };
  struct TextShape {
    int64_t vocab, width, layers, ffn;
  };

  explicit LdmSynth(std::vector<TensorPlan>* t) : t_(*t) {}

  void Unet(const UnetShape& c);
  void Vae(const VaeShape& c);
  void Clip(const TextShape& c, const std::string& prefix = kLdmClip);  // transformers' layout
  void OpenClip(const TextShape& c, const std::string& prefix = kLdmOpenClip);  // open_clip's
  // The DDPM schedule (values in (0, 1), not the real curve).
  void Schedule() {
    for (const char* buffer : kLdmScheduleBuffers) t_.push_back({buffer, {1000}, 0.5, 0.5});
  }

 private:
  void Linear(const std::string& name, int64_t in, int64_t out, bool bias = true) {
    t_.push_back({name + ".weight", {out, in}, InvSqrt(in)});
    if (bias) t_.push_back({name + ".bias", {out}, 0.1});
  }
  void Conv(const std::string& name, int64_t in, int64_t out, int64_t k) {
    t_.push_back({name + ".weight", {out, in, k, k}, InvSqrt(in * k * k)});
    t_.push_back({name + ".bias", {out}, 0.1});
  }
  void Norm(const std::string& name, int64_t n) {
    t_.push_back({name + ".weight", {n}, 0.1, 1.0});
    t_.push_back({name + ".bias", {n}, 0.1});
  }

  std::vector<TensorPlan>& t_;
};

void LdmSynth::Unet(const UnetShape& c) {
  const std::string u = kLdmUnet;
  const int64_t emb = 4 * c.model_channels;
  Linear(u + "time_embed.0", c.model_channels, emb);
  Linear(u + "time_embed.2", emb, emb);
  if (c.adm_in_channels > 0) {
    Linear(u + "label_emb.0.0", c.adm_in_channels, emb);
    Linear(u + "label_emb.0.2", emb, emb);
  }
  auto res_block = [&](const std::string& b, int64_t in, int64_t out) {
    Norm(b + "in_layers.0", in);
    Conv(b + "in_layers.2", in, out, 3);
    Linear(b + "emb_layers.1", emb, out);
    Norm(b + "out_layers.0", out);
    Conv(b + "out_layers.3", out, out, 3);
    if (in != out) Conv(b + "skip_connection", in, out, 1);
  };
  auto projection = [&](const std::string& name, int64_t ch) {
    if (c.linear_proj) {
      Linear(name, ch, ch);
    } else {
      Conv(name, ch, ch, 1);
    }
  };
  auto transformer = [&](const std::string& b, int64_t ch, int64_t depth) {
    Norm(b + "norm", ch);
    projection(b + "proj_in", ch);
    for (int64_t d = 0; d < depth; ++d) {
      const std::string tb = absl::StrCat(b, "transformer_blocks.", d, ".");
      for (const char* attn : {"attn1", "attn2"}) {
        const int64_t kv = std::string(attn) == "attn1" ? ch : c.context;
        Linear(tb + attn + ".to_q", ch, ch, false);
        Linear(tb + attn + ".to_k", kv, ch, false);
        Linear(tb + attn + ".to_v", kv, ch, false);
        Linear(tb + attn + ".to_out.0", ch, ch);
      }
      Linear(tb + "ff.net.0.proj", ch, 8 * ch);
      Linear(tb + "ff.net.2", 4 * ch, ch);
      for (const char* n : {"norm1", "norm2", "norm3"}) Norm(tb + n, ch);
    }
    projection(b + "proj_out", ch);
  };
  const size_t levels = c.mult.size();
  auto attention = [&c](size_t level) { return c.depth[level] > 0; };
  Conv(u + "input_blocks.0.0", c.in_channels, c.model_channels, 3);
  int64_t ch = c.model_channels, block = 1;
  std::vector<int64_t> skips = {ch};
  for (size_t level = 0; level < levels; ++level) {
    for (int64_t r = 0; r < c.res_blocks; ++r, ++block) {
      const std::string b = absl::StrCat(u, "input_blocks.", block, ".");
      res_block(b + "0.", ch, c.mult[level] * c.model_channels);
      ch = c.mult[level] * c.model_channels;
      if (attention(level)) transformer(b + "1.", ch, c.depth[level]);
      skips.push_back(ch);
    }
    if (level + 1 < levels) {
      Conv(absl::StrCat(u, "input_blocks.", block++, ".0.op"), ch, ch, 3);
      skips.push_back(ch);
    }
  }
  res_block(u + "middle_block.0.", ch, ch);
  transformer(u + "middle_block.1.", ch, c.middle_depth);
  res_block(u + "middle_block.2.", ch, ch);
  block = 0;
  for (size_t level = levels; level-- > 0;) {
    for (int64_t r = 0; r <= c.res_blocks; ++r, ++block) {
      const std::string b = absl::StrCat(u, "output_blocks.", block, ".");
      res_block(b + "0.", ch + skips.back(), c.mult[level] * c.model_channels);
      skips.pop_back();
      ch = c.mult[level] * c.model_channels;
      int64_t layer = 1;
      if (attention(level)) transformer(absl::StrCat(b, layer++, "."), ch, c.depth[level]);
      if (level > 0 && r == c.res_blocks) Conv(absl::StrCat(b, layer, ".conv"), ch, ch, 3);
    }
  }
  Norm(u + "out.0", ch);
  Conv(u + "out.2", ch, 4, 3);
}

void LdmSynth::Vae(const VaeShape& c) {
  const std::string v = kLdmVae;
  auto vae_res = [&](const std::string& b, int64_t in, int64_t out) {
    Norm(b + "norm1", in);
    Conv(b + "conv1", in, out, 3);
    Norm(b + "norm2", out);
    Conv(b + "conv2", out, out, 3);
    if (in != out) Conv(b + "nin_shortcut", in, out, 1);
  };
  auto vae_mid = [&](const std::string& m, int64_t n) {
    vae_res(m + "block_1.", n, n);
    Norm(m + "attn_1.norm", n);
    for (const char* x : {"q", "k", "v", "proj_out"}) Conv(m + "attn_1." + x, n, n, 1);
    vae_res(m + "block_2.", n, n);
  };
  Conv(v + "encoder.conv_in", 3, c.ch, 3);
  int64_t ch = c.ch;
  for (size_t level = 0; level < c.mult.size(); ++level) {
    for (int64_t r = 0; r < c.res_blocks; ++r) {
      vae_res(absl::StrCat(v, "encoder.down.", level, ".block.", r, "."), ch, c.ch * c.mult[level]);
      ch = c.ch * c.mult[level];
    }
    if (level + 1 < c.mult.size()) {
      Conv(absl::StrCat(v, "encoder.down.", level, ".downsample.conv"), ch, ch, 3);
    }
  }
  vae_mid(v + "encoder.mid.", ch);
  Norm(v + "encoder.norm_out", ch);
  Conv(v + "encoder.conv_out", ch, 8, 3);
  Conv(v + "decoder.conv_in", 4, ch, 3);
  vae_mid(v + "decoder.mid.", ch);
  for (size_t level = c.mult.size(); level-- > 0;) {
    for (int64_t r = 0; r <= c.res_blocks; ++r) {
      vae_res(absl::StrCat(v, "decoder.up.", level, ".block.", r, "."), ch, c.ch * c.mult[level]);
      ch = c.ch * c.mult[level];
    }
    if (level > 0) Conv(absl::StrCat(v, "decoder.up.", level, ".upsample.conv"), ch, ch, 3);
  }
  Norm(v + "decoder.norm_out", ch);
  Conv(v + "decoder.conv_out", ch, 3, 3);
  Conv(v + "quant_conv", 8, 8, 1);
  Conv(v + "post_quant_conv", 4, 4, 1);
}

void LdmSynth::Clip(const TextShape& c, const std::string& e) {
  t_.push_back({e + "embeddings.token_embedding.weight", {c.vocab, c.width}, 0.5});
  t_.push_back({e + "embeddings.position_embedding.weight", {77, c.width}, 0.1});
  t_.push_back({e + "embeddings.position_ids", {1, 77}, 0, 0, /*positions=*/true});
  for (int64_t i = 0; i < c.layers; ++i) {
    const std::string l = absl::StrCat(e, "encoder.layers.", i, ".");
    for (const char* x : {"q_proj", "k_proj", "v_proj", "out_proj"}) {
      Linear(l + "self_attn." + x, c.width, c.width);
    }
    Norm(l + "layer_norm1", c.width);
    Linear(l + "mlp.fc1", c.width, c.ffn);
    Linear(l + "mlp.fc2", c.ffn, c.width);
    Norm(l + "layer_norm2", c.width);
  }
  Norm(e + "final_layer_norm", c.width);
}

void LdmSynth::OpenClip(const TextShape& c, const std::string& e) {
  t_.push_back({e + "token_embedding.weight", {c.vocab, c.width}, 0.5});
  t_.push_back({e + "positional_embedding", {77, c.width}, 0.1});
  for (int64_t i = 0; i < c.layers; ++i) {
    const std::string l = absl::StrCat(e, "transformer.resblocks.", i, ".");
    Norm(l + "ln_1", c.width);
    t_.push_back({l + "attn.in_proj_weight", {3 * c.width, c.width}, InvSqrt(c.width)});
    t_.push_back({l + "attn.in_proj_bias", {3 * c.width}, 0.1});
    Linear(l + "attn.out_proj", c.width, c.width);
    Norm(l + "ln_2", c.width);
    Linear(l + "mlp.c_fc", c.width, c.ffn);
    Linear(l + "mlp.c_proj", c.ffn, c.width);
  }
  Norm(e + "ln_final", c.width);
  t_.push_back({e + "text_projection", {c.width, c.width}, InvSqrt(c.width)});
  t_.push_back({e + "logit_scale", {}, 0.1, 4.6});  // ln(100), as trained CLIPs end
}

// A variant's UNet input channels, or the plain model's.
template <size_t N>
int64_t UnetInChannels(const std::string& name, const LdmVariant (&variants)[N]) {
  for (const LdmVariant& variant : variants) {
    if (name == variant.name) return variant.unet_in_channels;
  }
  return kLdmUnetInChannels;
}

}  // namespace

// Stable Diffusion 1.x in the original LDM layout, one file: UNet, AutoencoderKL, CLIP text
// encoder and the DDPM schedule. "full" has the v1 inference config's shapes (1.07 G
// parameters); "tiny" keeps the topology (4 levels, attention on the first three, 8 heads) at
// 32 channels, as tests/tools/ref_sd1.py does.
absl::StatusOr<SynthPlan> Sd1SynthPlan(const std::string& name, const std::string& preset) {
  const int64_t in = UnetInChannels(name, kSd1Variants);
  SynthPlan p;
  LdmSynth synth(&p.tensors);
  if (preset == "tiny") {
    synth.Unet({in, 32, 2, 128, {1, 2, 2, 2}, {1, 1, 1, 0}, 1, false});
    synth.Vae({32, 1, {1, 2, 2, 2}});
    synth.Clip({1000, 128, 2, 512});
  } else if (preset == "full") {
    synth.Unet({in, 320, 2, 768, {1, 2, 4, 4}, {1, 1, 1, 0}, 1, false});
    synth.Vae({128, 2, {1, 2, 4, 4}});
    synth.Clip({49408, 768, 12, 3072});
  } else {
    return NoSuchPreset(name, preset);
  }
  synth.Schedule();
  return p;
}

// Stable Diffusion 2.x, one file: SD1's networks with linear transformer projections and a
// 1024-wide context, and the OpenCLIP ViT-H/14 text encoder. "full" has v2-inference-v.yaml's
// shapes (1.30 G parameters); "tiny" keeps the topology at 64 channels, so its 64-channel heads
// number 1 and 2 (tests/tools/ref_sd2.py). The weights say neither eps nor v clearly: the
// prediction read from them is "epsilon".
absl::StatusOr<SynthPlan> Sd2SynthPlan(const std::string& name, const std::string& preset) {
  const int64_t in = UnetInChannels(name, kSd2Variants);
  SynthPlan p;
  LdmSynth synth(&p.tensors);
  if (preset == "tiny") {
    synth.Unet({in, 64, 2, 128, {1, 2, 2, 2}, {1, 1, 1, 0}, 1, true});
    synth.Vae({32, 1, {1, 2, 2, 2}});
    synth.OpenClip({1000, 128, 2, 512});
  } else if (preset == "full") {
    synth.Unet({in, 320, 2, 1024, {1, 2, 4, 4}, {1, 1, 1, 0}, 1, true});
    synth.Vae({128, 2, {1, 2, 4, 4}});
    synth.OpenClip({49408, 1024, 24, 4096});
  } else {
    return NoSuchPreset(name, preset);
  }
  synth.Schedule();
  return p;
}

// Stable Diffusion XL, one file in sgm's layout: base (CLIP ViT-L and OpenCLIP bigG,
// conditioner.embedders.0 and .1) or refiner (bigG alone, embedders.0). "full" has
// sd_xl_base.yaml's and sd_xl_refiner.yaml's shapes (base: 2.57 G UNet parameters, 3.47 G in
// all); "tiny" keeps the topology (no attention on the first level, deeper transformers below,
// label_emb taking pooled + 6 or 5 x 256 size embeddings) at 64 channels (tests/tools/
// ref_sdxl.py).
absl::StatusOr<SynthPlan> SdxlSynthPlan(const std::string& name, const std::string& preset) {
  const bool refiner = name == kSdxlRefiner;
  const int64_t in = UnetInChannels(name, kSdxlVariants);
  SynthPlan p;
  LdmSynth synth(&p.tensors);
  const bool tiny = preset == "tiny";
  if (!tiny && preset != "full") return NoSuchPreset(name, preset);
  const LdmSynth::TextShape clip =
      tiny ? LdmSynth::TextShape{1000, 128, 2, 512} : LdmSynth::TextShape{49408, 768, 12, 3072};
  const LdmSynth::TextShape big_g =
      tiny ? LdmSynth::TextShape{1000, 128, 3, 512} : LdmSynth::TextShape{49408, 1280, 32, 5120};
  // y: the pooled bigG embedding, then 256 Fourier features per size condition (base: original
  // size, crop, target size = 6; refiner: original size, crop, aesthetic score = 5).
  const int64_t adm = big_g.width + (refiner ? 5 : 6) * 256;
  if (refiner) {
    synth.Unet(
        tiny ? LdmSynth::UnetShape{in, 64, 2, big_g.width, {1, 2, 2, 2}, {0, 1, 1, 0}, 1, true, adm}
             : LdmSynth::UnetShape{
                   in, 384, 2, big_g.width, {1, 2, 4, 4}, {0, 4, 4, 0}, 4, true, adm});
    synth.OpenClip(big_g, kSgmRefinerOpenClip);
  } else {
    const int64_t context = clip.width + big_g.width;
    synth.Unet(
        tiny ? LdmSynth::UnetShape{in, 64, 2, context, {1, 2, 2}, {0, 1, 2}, 2, true, adm}
             : LdmSynth::UnetShape{in, 320, 2, context, {1, 2, 4}, {0, 2, 10}, 10, true, adm});
    synth.Clip(clip, kSgmClip);
    synth.OpenClip(big_g, kSgmOpenClip);
  }
  synth.Vae(tiny ? LdmSynth::VaeShape{32, 1, {1, 2, 2, 2}}
                 : LdmSynth::VaeShape{128, 2, {1, 2, 4, 4}});
  return p;
}

}  // namespace metaload::models
