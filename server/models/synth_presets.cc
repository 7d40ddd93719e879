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

// Stable Diffusion 1.x in the original LDM layout, one file: UNet, AutoencoderKL, CLIP text
// encoder and the DDPM schedule. "full" has the v1 inference config's shapes (1.07 G
// parameters); "tiny" keeps the topology (4 levels, attention on the first three, 8 heads) at
// 32 channels, as tests/tools/ref_sd1.py does.
absl::StatusOr<SynthPlan> Sd1SynthPlan(const std::string& name, const std::string& preset) {
  struct {
    int64_t mc, res, ctx;  // UNet
    int64_t vae_ch, vae_res;
    int64_t vocab, width, layers, ffn;  // CLIP
    std::vector<int64_t> mult, vae_mult;
  } c;
  if (preset == "tiny") {
    c = {32, 2, 128, 32, 1, 1000, 128, 2, 512, {1, 2, 2, 2}, {1, 2, 2, 2}};
  } else if (preset == "full") {
    c = {320, 2, 768, 128, 2, 49408, 768, 12, 3072, {1, 2, 4, 4}, {1, 2, 4, 4}};
  } else {
    return NoSuchPreset(name, preset);
  }
  int64_t in_channels = kSd1UnetInChannels;
  for (const Sd1Variant& variant : kSd1Variants) {
    if (name == variant.name) in_channels = variant.unet_in_channels;
  }
  SynthPlan p;
  std::vector<TensorPlan>& t = p.tensors;
  auto linear = [&t](const std::string& name, int64_t in, int64_t out, bool bias = true) {
    t.push_back({name + ".weight", {out, in}, InvSqrt(in)});
    if (bias) t.push_back({name + ".bias", {out}, 0.1});
  };
  auto conv = [&t](const std::string& name, int64_t in, int64_t out, int64_t k) {
    t.push_back({name + ".weight", {out, in, k, k}, InvSqrt(in * k * k)});
    t.push_back({name + ".bias", {out}, 0.1});
  };
  auto norm = [&t](const std::string& name, int64_t n) {
    t.push_back({name + ".weight", {n}, 0.1, 1.0});
    t.push_back({name + ".bias", {n}, 0.1});
  };

  // UNet.
  const std::string u = kLdmUnet;
  const int64_t emb = 4 * c.mc;
  linear(u + "time_embed.0", c.mc, emb);
  linear(u + "time_embed.2", emb, emb);
  auto res_block = [&](const std::string& b, int64_t in, int64_t out) {
    norm(b + "in_layers.0", in);
    conv(b + "in_layers.2", in, out, 3);
    linear(b + "emb_layers.1", emb, out);
    norm(b + "out_layers.0", out);
    conv(b + "out_layers.3", out, out, 3);
    if (in != out) conv(b + "skip_connection", in, out, 1);
  };
  auto transformer = [&](const std::string& b, int64_t ch) {
    norm(b + "norm", ch);
    conv(b + "proj_in", ch, ch, 1);
    const std::string tb = b + "transformer_blocks.0.";
    for (const char* attn : {"attn1", "attn2"}) {
      const int64_t kv = std::string(attn) == "attn1" ? ch : c.ctx;
      linear(tb + attn + ".to_q", ch, ch, false);
      linear(tb + attn + ".to_k", kv, ch, false);
      linear(tb + attn + ".to_v", kv, ch, false);
      linear(tb + attn + ".to_out.0", ch, ch);
    }
    linear(tb + "ff.net.0.proj", ch, 8 * ch);
    linear(tb + "ff.net.2", 4 * ch, ch);
    for (const char* n : {"norm1", "norm2", "norm3"}) norm(tb + n, ch);
    conv(b + "proj_out", ch, ch, 1);
  };
  const size_t levels = c.mult.size();
  auto attention = [levels](size_t level) { return level + 1 < levels; };
  conv(u + "input_blocks.0.0", in_channels, c.mc, 3);
  int64_t ch = c.mc, block = 1;
  std::vector<int64_t> skips = {ch};
  for (size_t level = 0; level < levels; ++level) {
    for (int64_t r = 0; r < c.res; ++r, ++block) {
      const std::string b = absl::StrCat(u, "input_blocks.", block, ".");
      res_block(b + "0.", ch, c.mult[level] * c.mc);
      ch = c.mult[level] * c.mc;
      if (attention(level)) transformer(b + "1.", ch);
      skips.push_back(ch);
    }
    if (level + 1 < levels) {
      conv(absl::StrCat(u, "input_blocks.", block++, ".0.op"), ch, ch, 3);
      skips.push_back(ch);
    }
  }
  res_block(u + "middle_block.0.", ch, ch);
  transformer(u + "middle_block.1.", ch);
  res_block(u + "middle_block.2.", ch, ch);
  block = 0;
  for (size_t level = levels; level-- > 0;) {
    for (int64_t r = 0; r <= c.res; ++r, ++block) {
      const std::string b = absl::StrCat(u, "output_blocks.", block, ".");
      res_block(b + "0.", ch + skips.back(), c.mult[level] * c.mc);
      skips.pop_back();
      ch = c.mult[level] * c.mc;
      int64_t layer = 1;
      if (attention(level)) transformer(absl::StrCat(b, layer++, "."), ch);
      if (level > 0 && r == c.res) conv(absl::StrCat(b, layer, ".conv"), ch, ch, 3);
    }
  }
  norm(u + "out.0", ch);
  conv(u + "out.2", ch, 4, 3);

  // AutoencoderKL.
  const std::string v = kLdmVae;
  auto vae_res = [&](const std::string& b, int64_t in, int64_t out) {
    norm(b + "norm1", in);
    conv(b + "conv1", in, out, 3);
    norm(b + "norm2", out);
    conv(b + "conv2", out, out, 3);
    if (in != out) conv(b + "nin_shortcut", in, out, 1);
  };
  auto vae_mid = [&](const std::string& m, int64_t n) {
    vae_res(m + "block_1.", n, n);
    norm(m + "attn_1.norm", n);
    for (const char* x : {"q", "k", "v", "proj_out"}) conv(m + "attn_1." + x, n, n, 1);
    vae_res(m + "block_2.", n, n);
  };
  conv(v + "encoder.conv_in", 3, c.vae_ch, 3);
  ch = c.vae_ch;
  for (size_t level = 0; level < c.vae_mult.size(); ++level) {
    for (int64_t r = 0; r < c.vae_res; ++r) {
      vae_res(absl::StrCat(v, "encoder.down.", level, ".block.", r, "."), ch,
              c.vae_ch * c.vae_mult[level]);
      ch = c.vae_ch * c.vae_mult[level];
    }
    if (level + 1 < c.vae_mult.size()) {
      conv(absl::StrCat(v, "encoder.down.", level, ".downsample.conv"), ch, ch, 3);
    }
  }
  vae_mid(v + "encoder.mid.", ch);
  norm(v + "encoder.norm_out", ch);
  conv(v + "encoder.conv_out", ch, 8, 3);
  conv(v + "decoder.conv_in", 4, ch, 3);
  vae_mid(v + "decoder.mid.", ch);
  for (size_t level = c.vae_mult.size(); level-- > 0;) {
    for (int64_t r = 0; r <= c.vae_res; ++r) {
      vae_res(absl::StrCat(v, "decoder.up.", level, ".block.", r, "."), ch,
              c.vae_ch * c.vae_mult[level]);
      ch = c.vae_ch * c.vae_mult[level];
    }
    if (level > 0) conv(absl::StrCat(v, "decoder.up.", level, ".upsample.conv"), ch, ch, 3);
  }
  norm(v + "decoder.norm_out", ch);
  conv(v + "decoder.conv_out", ch, 3, 3);
  conv(v + "quant_conv", 8, 8, 1);
  conv(v + "post_quant_conv", 4, 4, 1);

  // CLIP text encoder.
  const std::string e = kLdmClip;
  t.push_back({e + "embeddings.token_embedding.weight", {c.vocab, c.width}, 0.5});
  t.push_back({e + "embeddings.position_embedding.weight", {77, c.width}, 0.1});
  t.push_back({e + "embeddings.position_ids", {1, 77}, 0, 0, /*positions=*/true});
  for (int64_t i = 0; i < c.layers; ++i) {
    const std::string l = absl::StrCat(e, "encoder.layers.", i, ".");
    for (const char* x : {"q_proj", "k_proj", "v_proj", "out_proj"}) {
      linear(l + "self_attn." + x, c.width, c.width);
    }
    norm(l + "layer_norm1", c.width);
    linear(l + "mlp.fc1", c.width, c.ffn);
    linear(l + "mlp.fc2", c.ffn, c.width);
    norm(l + "layer_norm2", c.width);
  }
  norm(e + "final_layer_norm", c.width);

  // The DDPM schedule (values in (0, 1), not the real curve).
  for (const char* buffer : kLdmScheduleBuffers) t.push_back({buffer, {1000}, 0.5, 0.5});
  return p;
}

}  // namespace metaload::models
