// gpt2: Hugging Face GPT2LMHeadModel. Conv1D weights are stored [in, out]; learned positions;
// lm_head tied to wte. Keys with or without the "transformer." prefix.
#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"
#include "server/core/layers.h"
#include "server/models/causal_lm.h"

namespace metaload::models {
namespace {

// GPT-2's "Conv1D": y = x W + b with W [in, out].
class Conv1D : public core::Module {
 public:
  Conv1D(int64_t in, int64_t out)
      : weight_(AddWeight("weight", {in, out}, nullptr, core::TensorUse::kMatmulWeight)),
        bias_(AddWeight("bias", {out}, nullptr, core::TensorUse::kWeight)) {}
  at::Tensor Forward(const at::Tensor& x) const {
    return at::matmul(x, Weight(weight_)) + Weight(bias_);
  }

 private:
  at::Tensor& weight_;
  at::Tensor& bias_;
};

struct Gpt2Config {
  int64_t n_embd, n_layer, n_head, n_positions, vocab_size;
  double eps;
  std::string activation;
};

class Block : public core::Module {
 public:
  explicit Block(const Gpt2Config& c)
      : c_(c),
        ln_1(AddChild("ln_1", std::make_unique<core::LayerNorm>(c.n_embd, c.eps))),
        c_attn(AddChild("attn.c_attn", std::make_unique<Conv1D>(c.n_embd, 3 * c.n_embd))),
        attn_proj(AddChild("attn.c_proj", std::make_unique<Conv1D>(c.n_embd, c.n_embd))),
        ln_2(AddChild("ln_2", std::make_unique<core::LayerNorm>(c.n_embd, c.eps))),
        c_fc(AddChild("mlp.c_fc", std::make_unique<Conv1D>(c.n_embd, 4 * c.n_embd))),
        mlp_proj(AddChild("mlp.c_proj", std::make_unique<Conv1D>(4 * c.n_embd, c.n_embd))) {}

  at::Tensor Forward(const at::Tensor& x, const at::Tensor& mask) const {
    const int64_t b = x.size(0), t = x.size(1), hd = c_.n_embd / c_.n_head;
    std::vector<at::Tensor> qkv = c_attn.Forward(ln_1.Forward(x)).split(c_.n_embd, -1);
    auto heads = [&](const at::Tensor& y) { return y.view({b, t, c_.n_head, hd}).transpose(1, 2); };
    at::Tensor a = core::ScaledDotProductAttention(heads(qkv[0]), heads(qkv[1]), heads(qkv[2]),
                                                   /*causal=*/true, mask);
    at::Tensor h = x + attn_proj.Forward(a.transpose(1, 2).reshape({b, t, c_.n_embd}));
    at::Tensor m = c_fc.Forward(ln_2.Forward(h));
    if (c_.activation == "relu") {
      m = at::relu(m);
    } else if (c_.activation == "gelu") {
      m = at::gelu(m);
    } else {
      m = at::gelu(m, "tanh");  // gelu_new, gelu_pytorch_tanh
    }
    return h + mlp_proj.Forward(m);
  }

 private:
  Gpt2Config c_;
  core::LayerNorm& ln_1;
  Conv1D& c_attn;
  Conv1D& attn_proj;
  core::LayerNorm& ln_2;
  Conv1D& c_fc;
  Conv1D& mlp_proj;
};

class Gpt2Module : public core::Module {
 public:
  explicit Gpt2Module(const Gpt2Config& c)
      : wte(AddChild("wte", std::make_unique<core::Embedding>(c.vocab_size, c.n_embd))),
        wpe(AddChild("wpe", std::make_unique<core::Embedding>(c.n_positions, c.n_embd))) {
    for (int64_t i = 0; i < c.n_layer; ++i) {
      blocks.push_back(&AddChild(absl::StrCat("h.", i), std::make_unique<Block>(c)));
    }
    ln_f = &AddChild("ln_f", std::make_unique<core::LayerNorm>(c.n_embd, c.eps));
  }
  core::Embedding& wte;
  core::Embedding& wpe;
  std::vector<Block*> blocks;
  core::LayerNorm* ln_f;
};

class Gpt2 : public CausalLm {
 public:
  Gpt2(const Gpt2Config& c, bool prefixed)
      : CausalLm({c.vocab_size, c.n_positions, "n_positions"}), net_(BuildModule<Gpt2Module>(c)) {
    if (prefixed) SetKeyMap([](const std::string& name) { return "transformer." + name; });
  }

  std::string architecture() const override { return "gpt2"; }

 protected:
  at::Tensor Logits(const at::Tensor& ids, const at::Tensor& mask) const override {
    at::Tensor positions =
        at::arange(ids.size(1), at::TensorOptions().dtype(at::kLong).device(ids.device()));
    at::Tensor x = net_.wte.Forward(ids) + net_.wpe.Forward(positions).unsqueeze(0);
    for (const Block* block : net_.blocks) x = block->Forward(x, mask);
    x = net_.ln_f->Forward(x);
    return at::matmul(x, net_.wte.weight().t());
  }

 private:
  const Gpt2Module& net_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Model>> BuildGpt2(const core::CheckpointIndex& index) {
  absl::StatusOr<nlohmann::json> config = ParseConfig(index, "gpt2");
  if (!config.ok()) return config.status();
  const bool prefixed = index.Find("transformer.wte.weight") != nullptr;
  const core::TensorInfo* wte = index.Find(prefixed ? "transformer.wte.weight" : "wte.weight");
  const core::TensorInfo* wpe = index.Find(prefixed ? "transformer.wpe.weight" : "wpe.weight");
  // Without a config.json, widths come from the embeddings; depth from the highest block.
  int64_t layers = 0;
  while (index.Find(absl::StrCat(prefixed ? "transformer." : "", "h.", layers, ".ln_1.weight"))) {
    ++layers;
  }
  Gpt2Config c;
  absl::StatusOr<int64_t> v;
  if (!(v = ConfigInt(*config, "n_embd", "gpt2",
                      wte ? std::optional<int64_t>(wte->shape.back()) : std::nullopt))
           .ok())
    return v.status();
  c.n_embd = *v;
  if (!(v = ConfigInt(*config, "n_layer", "gpt2",
                      layers > 0 ? std::optional<int64_t>(layers) : std::nullopt))
           .ok())
    return v.status();
  c.n_layer = *v;
  if (!(v = ConfigInt(*config, "n_head", "gpt2",
                      c.n_embd % 64 == 0 ? std::optional<int64_t>(c.n_embd / 64) : std::nullopt))
           .ok())
    return v.status();
  c.n_head = *v;
  if (!(v = ConfigInt(*config, "n_positions", "gpt2",
                      wpe ? std::optional<int64_t>(wpe->shape.front()) : std::nullopt))
           .ok())
    return v.status();
  c.n_positions = *v;
  if (!(v = ConfigInt(*config, "vocab_size", "gpt2",
                      wte ? std::optional<int64_t>(wte->shape.front()) : std::nullopt))
           .ok())
    return v.status();
  c.vocab_size = *v;
  absl::StatusOr<double> eps = ConfigDouble(*config, "layer_norm_epsilon", "gpt2", 1e-5);
  if (!eps.ok()) return eps.status();
  c.eps = *eps;
  absl::StatusOr<std::string> activation =
      ConfigString(*config, "activation_function", "gpt2", "gelu_new");
  if (!activation.ok()) return activation.status();
  c.activation = *activation;
  if (c.n_embd % c.n_head != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("gpt2: n_embd ", c.n_embd, " is not a multiple of n_head ", c.n_head));
  }
  return std::unique_ptr<Model>(new Gpt2(c, prefixed));
}

}  // namespace metaload::models
