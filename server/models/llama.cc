// llama: Hugging Face LlamaForCausalLM. RMSNorm, rotary embeddings (rotate_half convention),
// SwiGLU, grouped-query attention, optionally tied embeddings.
#include <ATen/ATen.h>

#include <cmath>

#include "absl/strings/str_cat.h"
#include "server/core/layers.h"
#include "server/models/causal_lm.h"

namespace metaload::models {
namespace {

struct LlamaConfig {
  int64_t hidden, intermediate, layers, heads, kv_heads, vocab, max_positions;
  double eps, rope_theta;
  bool tie;
};

class Layer : public core::Module {
 public:
  explicit Layer(const LlamaConfig& c)
      : input_norm(AddChild("input_layernorm", std::make_unique<core::RMSNorm>(c.hidden, c.eps))),
        attn(AddChild("self_attn", std::make_unique<core::Attention>(core::Attention::Options{
                                       c.hidden, c.heads, c.kv_heads, false, false}))),
        post_norm(
            AddChild("post_attention_layernorm", std::make_unique<core::RMSNorm>(c.hidden, c.eps))),
        gate(AddChild("mlp.gate_proj",
                      std::make_unique<core::Linear>(c.hidden, c.intermediate, false))),
        up(AddChild("mlp.up_proj",
                    std::make_unique<core::Linear>(c.hidden, c.intermediate, false))),
        down(AddChild("mlp.down_proj",
                      std::make_unique<core::Linear>(c.intermediate, c.hidden, false))) {}

  at::Tensor Forward(const at::Tensor& x, const at::Tensor& mask,
                     const core::Attention::PositionFn& rope) const {
    at::Tensor h = x + attn.Forward(input_norm.Forward(x), /*causal=*/true, mask, rope);
    at::Tensor n = post_norm.Forward(h);
    return h + down.Forward(at::silu(gate.Forward(n)) * up.Forward(n));
  }

 private:
  core::RMSNorm& input_norm;
  core::Attention& attn;
  core::RMSNorm& post_norm;
  core::Linear& gate;
  core::Linear& up;
  core::Linear& down;
};

class LlamaModule : public core::Module {
 public:
  explicit LlamaModule(const LlamaConfig& c)
      : embed(
            AddChild("model.embed_tokens", std::make_unique<core::Embedding>(c.vocab, c.hidden))) {
    for (int64_t i = 0; i < c.layers; ++i) {
      layers.push_back(&AddChild(absl::StrCat("model.layers.", i), std::make_unique<Layer>(c)));
    }
    norm = &AddChild("model.norm", std::make_unique<core::RMSNorm>(c.hidden, c.eps));
    if (!c.tie)
      lm_head = &AddChild("lm_head", std::make_unique<core::Linear>(c.hidden, c.vocab, false));
  }
  core::Embedding& embed;
  std::vector<Layer*> layers;
  core::RMSNorm* norm = nullptr;
  core::Linear* lm_head = nullptr;
};

at::Tensor RotateHalf(const at::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
}

class Llama : public CausalLm {
 public:
  explicit Llama(const LlamaConfig& c)
      : CausalLm({c.vocab, c.max_positions, "max_position_embeddings"}),
        c_(c),
        net_(BuildModule<LlamaModule>(c)) {}

  std::string architecture() const override { return "llama"; }

 protected:
  at::Tensor Logits(const at::Tensor& ids, const at::Tensor& mask) const override {
    // Rotary tables for positions 0..t-1, computed in float32.
    const int64_t t = ids.size(1), hd = c_.hidden / c_.heads;
    const auto f32 = at::TensorOptions().dtype(at::kFloat).device(ids.device());
    at::Tensor inv_freq =
        1.0 / at::pow(c_.rope_theta, at::arange(0, hd, 2, f32) / static_cast<double>(hd));
    at::Tensor freqs = at::outer(at::arange(t, f32), inv_freq);
    at::Tensor emb = at::cat({freqs, freqs}, -1);
    at::Tensor cos = emb.cos(), sin = emb.sin();
    core::Attention::PositionFn rope = [&](at::Tensor& q, at::Tensor& k) {
      const auto type = q.scalar_type();
      at::Tensor q32 = q.to(at::kFloat), k32 = k.to(at::kFloat);
      q = (q32 * cos + RotateHalf(q32) * sin).to(type);
      k = (k32 * cos + RotateHalf(k32) * sin).to(type);
    };
    at::Tensor x = net_.embed.Forward(ids);
    for (const Layer* layer : net_.layers) x = layer->Forward(x, mask, rope);
    x = net_.norm->Forward(x);
    return c_.tie ? at::matmul(x, net_.embed.weight().t()) : net_.lm_head->Forward(x);
  }

 private:
  LlamaConfig c_;
  const LlamaModule& net_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Model>> BuildLlama(const core::CheckpointIndex& index) {
  absl::StatusOr<nlohmann::json> config = ParseConfig(index, "llama");
  if (!config.ok()) return config.status();
  if (config->empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        index.path, ": llama needs a config.json (hidden_size, num_attention_heads, ...)"));
  }
  LlamaConfig c;
  absl::StatusOr<int64_t> v;
  struct IntField {
    const char* key;
    int64_t* out;
    std::optional<int64_t> fallback;
  };
  for (const IntField& f : {IntField{"hidden_size", &c.hidden, std::nullopt},
                            IntField{"intermediate_size", &c.intermediate, std::nullopt},
                            IntField{"num_hidden_layers", &c.layers, std::nullopt},
                            IntField{"num_attention_heads", &c.heads, std::nullopt},
                            IntField{"vocab_size", &c.vocab, std::nullopt},
                            IntField{"max_position_embeddings", &c.max_positions, 2048}}) {
    if (!(v = ConfigInt(*config, f.key, "llama", f.fallback)).ok()) return v.status();
    *f.out = *v;
  }
  if (!(v = ConfigInt(*config, "num_key_value_heads", "llama", c.heads)).ok()) return v.status();
  c.kv_heads = *v;
  absl::StatusOr<double> d = ConfigDouble(*config, "rms_norm_eps", "llama", 1e-6);
  if (!d.ok()) return d.status();
  c.eps = *d;
  if (!(d = ConfigDouble(*config, "rope_theta", "llama", 10000.0)).ok()) return d.status();
  c.rope_theta = *d;
  absl::StatusOr<bool> tie = ConfigBool(*config, "tie_word_embeddings", "llama", false);
  if (!tie.ok()) return tie.status();
  c.tie = *tie;
  if (c.hidden % c.heads != 0 || c.heads % c.kv_heads != 0 || (c.hidden / c.heads) % 2 != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "llama: hidden_size ", c.hidden, ", num_attention_heads ", c.heads,
        " and num_key_value_heads ", c.kv_heads, " do not divide into even head dimensions"));
  }
  return std::unique_ptr<Model>(new Llama(c));
}

}  // namespace metaload::models
