#include "server/models/synth.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "server/core/dtype.h"
#include "server/core/half.h"
#include "server/core/safetensors_writer.h"

namespace metaload::models {
namespace {

namespace fs = std::filesystem;

struct TensorPlan {
  std::string name;
  std::vector<int64_t> shape;
  double scale;  // values are uniform in [center - scale, center + scale]
  double center = 0;
};

struct Preset {
  nlohmann::ordered_json config;
  std::vector<TensorPlan> tensors;
};

double InvSqrt(int64_t n) { return 1.0 / std::sqrt(static_cast<double>(n)); }

// GPT2LMHeadModel layout, "transformer." prefix, no lm_head (tied).
absl::StatusOr<Preset> Gpt2Preset(const std::string& preset) {
  int64_t n, layers, heads, positions, vocab;
  if (preset == "tiny") {
    n = 32, layers = 2, heads = 4, positions = 64, vocab = 128;
  } else if (preset == "small") {
    n = 256, layers = 4, heads = 4, positions = 256, vocab = 4096;
  } else if (preset == "medium") {
    n = 1024, layers = 24, heads = 16, positions = 1024, vocab = 50257;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("synth: unknown preset '", preset, "' for gpt2 (tiny, small, medium)"));
  }
  Preset p;
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
absl::StatusOr<Preset> LlamaPreset(const std::string& preset) {
  int64_t hidden, inter, layers, heads, kv, vocab, positions;
  if (preset == "tiny") {
    hidden = 32, inter = 64, layers = 2, heads = 4, kv = 2, vocab = 128, positions = 64;
  } else if (preset == "small") {
    hidden = 256, inter = 688, layers = 4, heads = 8, kv = 4, vocab = 4096, positions = 256;
  } else if (preset == "medium") {
    hidden = 1024, inter = 2816, layers = 16, heads = 16, kv = 8, vocab = 32000, positions = 2048;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("synth: unknown preset '", preset, "' for llama (tiny, small, medium)"));
  }
  Preset p;
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

uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// The value of element `i` of tensor number `tensor`: a pure function of its coordinates.
float ValueAt(uint64_t seed, uint64_t tensor, uint64_t i, double scale) {
  uint64_t bits = SplitMix64(SplitMix64(seed ^ (tensor << 40)) + i);
  double unit = static_cast<double>(bits >> 11) * (1.0 / 9007199254740992.0);  // [0, 1)
  return static_cast<float>((2.0 * unit - 1.0) * scale);
}

absl::StatusOr<std::vector<int64_t>> MlpSizes(const std::string& preset) {
  if (preset == "tiny") return std::vector<int64_t>{16, 32, 32, 8};
  if (preset == "small") return std::vector<int64_t>{256, 1024, 1024, 256};
  if (preset == "medium") return std::vector<int64_t>{1024, 4096, 4096, 4096, 1024};
  return absl::InvalidArgumentError(
      absl::StrCat("synth: unknown preset '", preset, "' for mlp (tiny, small, medium)"));
}

}  // namespace

absl::StatusOr<SynthResult> Synthesize(const SynthOptions& options, const std::string& out_dir) {
  if (options.architecture != "mlp" && options.architecture != "gpt2" &&
      options.architecture != "llama") {
    return absl::InvalidArgumentError(absl::StrCat("synth: unknown architecture '",
                                                   options.architecture, "' (mlp, gpt2, llama)"));
  }
  std::optional<core::DType> st_dtype = core::DTypeFromName(options.dtype);
  if (!st_dtype ||
      (options.dtype != "float32" && options.dtype != "float16" && options.dtype != "bfloat16")) {
    return absl::InvalidArgumentError(absl::StrCat(
        "synth: dtype must be float32, float16 or bfloat16, not '", options.dtype, "'"));
  }
  std::vector<TensorPlan> plan;
  nlohmann::ordered_json config;
  if (options.architecture == "mlp") {
    absl::StatusOr<std::vector<int64_t>> sizes = MlpSizes(options.preset);
    if (!sizes.ok()) return sizes.status();
    for (size_t i = 0; i + 1 < sizes->size(); ++i) {
      int64_t in = (*sizes)[i], out = (*sizes)[i + 1];
      double scale = 1.0 / std::sqrt(static_cast<double>(in));
      plan.push_back({absl::StrCat("layers.", i, ".weight"), {out, in}, scale});
      plan.push_back({absl::StrCat("layers.", i, ".bias"), {out}, scale});
    }
    config = {{"model_type", "mlp"},
              {"architectures", {"MLP"}},
              {"layer_sizes", *sizes},
              {"activation", "gelu"}};
  } else {
    absl::StatusOr<Preset> preset =
        options.architecture == "gpt2" ? Gpt2Preset(options.preset) : LlamaPreset(options.preset);
    if (!preset.ok()) return preset.status();
    plan = std::move(preset->tensors);
    config = std::move(preset->config);
  }
  config["torch_dtype"] = options.dtype;
  if (options.shards < 1 || options.shards > static_cast<int>(plan.size())) {
    return absl::InvalidArgumentError(absl::StrCat("synth: shards must be between 1 and ",
                                                   plan.size(), " for this model, not ",
                                                   options.shards));
  }

  std::error_code ec;
  fs::create_directories(out_dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("synth: create ", out_dir, ": ", ec.message()));

  const std::string dtype = options.dtype;
  const uint64_t seed = options.seed;
  SynthResult result;
  std::vector<core::SafetensorsWriter> writers(static_cast<size_t>(options.shards));
  std::vector<std::string> shard_names;
  for (int s = 0; s < options.shards; ++s) {
    shard_names.push_back(options.shards == 1 ? "model.safetensors"
                                              : absl::StrFormat("model-%05d-of-%05d.safetensors",
                                                                s + 1, options.shards));
    writers[static_cast<size_t>(s)].SetMetadata("format", "pt");
  }
  nlohmann::ordered_json weight_map = nlohmann::ordered_json::object();
  for (size_t t = 0; t < plan.size(); ++t) {
    const TensorPlan& p = plan[t];
    // Contiguous runs of tensors per shard, like Hugging Face's sharding.
    size_t shard = t * static_cast<size_t>(options.shards) / plan.size();
    int64_t numel = 1;
    for (int64_t d : p.shape) numel *= d;
    result.parameter_count += numel;
    ++result.tensor_count;
    weight_map[p.name] = shard_names[shard];
    const double scale = p.scale;
    const float center = static_cast<float>(p.center);
    auto fill = [seed, t, scale, center, dtype](char* dst, int64_t offset, int64_t nbytes) {
      if (dtype == "float32") {
        for (int64_t b = 0; b < nbytes; b += 4) {
          float v = center + ValueAt(seed, t, static_cast<uint64_t>((offset + b) / 4), scale);
          std::memcpy(dst + b, &v, 4);
        }
      } else {
        for (int64_t b = 0; b < nbytes; b += 2) {
          float v = center + ValueAt(seed, t, static_cast<uint64_t>((offset + b) / 2), scale);
          uint16_t bits =
              dtype == "float16" ? core::FloatToHalfBits(v) : core::FloatToBFloat16Bits(v);
          std::memcpy(dst + b, &bits, 2);
        }
      }
    };
    absl::Status added = writers[shard].Add(p.name, *st_dtype, p.shape, fill);
    if (!added.ok()) return added;
  }

  for (int s = 0; s < options.shards; ++s) {
    core::SafetensorsWriter& w = writers[static_cast<size_t>(s)];
    absl::Status written = w.Write((fs::path(out_dir) / shard_names[s]).string());
    if (!written.ok()) return written;
    result.data_bytes += w.data_bytes();
    result.files.push_back(shard_names[s]);
  }

  auto write_json = [&](const std::string& name, const nlohmann::ordered_json& j) -> absl::Status {
    std::string path = (fs::path(out_dir) / name).string();
    std::ofstream f(path, std::ios::trunc);
    f << j.dump(2) << "\n";
    f.close();
    if (!f) return absl::InternalError(absl::StrCat("synth: write ", path));
    result.files.push_back(name);
    return absl::OkStatus();
  };
  if (options.shards > 1) {
    nlohmann::ordered_json index = {{"metadata", {{"total_size", result.data_bytes}}},
                                    {"weight_map", weight_map}};
    absl::Status s = write_json("model.safetensors.index.json", index);
    if (!s.ok()) return s;
  }
  absl::Status s = write_json("config.json", config);
  if (!s.ok()) return s;
  return result;
}

}  // namespace metaload::models
