// mlp: Linear layers "layers.{i}" with an activation between them (not after the last).
// Layer sizes come from config.json's layer_sizes, or from the checkpoint's weight shapes.
#include <ATen/ATen.h>

#include "absl/strings/str_cat.h"
#include "server/core/layers.h"
#include "server/models/meta_module_model.h"

namespace metaload::models {
namespace {

class MlpModule : public core::Module {
 public:
  MlpModule(const std::vector<int64_t>& sizes) {
    for (size_t i = 0; i + 1 < sizes.size(); ++i) {
      layers.push_back(&AddChild(absl::StrCat("layers.", i),
                                 std::make_unique<core::Linear>(sizes[i], sizes[i + 1])));
    }
  }
  std::vector<core::Linear*> layers;
};

class Mlp : public MetaModuleModel {
 public:
  Mlp(std::vector<int64_t> sizes, std::string activation)
      : sizes_(std::move(sizes)),
        activation_(std::move(activation)),
        layers_(BuildModule<MlpModule>(sizes_).layers) {}

  std::string architecture() const override { return "mlp"; }
  std::vector<EntrySpec> Entries() const override {
    return {{"forward",
             {{"input", std::nullopt, {-1, sizes_.front()}}},
             {{"output", std::nullopt, {-1, sizes_.back()}}}}};
  }

 protected:
  absl::StatusOr<NamedTensors> Forward(
      const std::string&, const std::map<std::string, at::Tensor>& inputs) const override {
    at::Tensor x = inputs.at("input");
    for (size_t i = 0; i < layers_.size(); ++i) {
      x = layers_[i]->Forward(x);
      if (i + 1 < layers_.size()) x = Activate(x);
    }
    return NamedTensors{{"output", x}};
  }

 private:
  at::Tensor Activate(const at::Tensor& x) const {
    if (activation_ == "relu") return at::relu(x);
    if (activation_ == "tanh") return at::tanh(x);
    if (activation_ == "silu") return at::silu(x);
    return at::gelu(x);
  }

  std::vector<int64_t> sizes_;
  std::string activation_;
  std::vector<core::Linear*> layers_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Model>> BuildMlp(const core::CheckpointIndex& index) {
  absl::StatusOr<nlohmann::json> config = ParseConfig(index, "mlp");
  if (!config.ok()) return config.status();
  std::vector<int64_t> sizes;
  auto listed = config->find("layer_sizes");
  if (listed != config->end() && listed->is_array()) {
    for (const auto& v : *listed) {
      if (!v.is_number_integer() || v.get<int64_t>() <= 0) {
        return absl::FailedPreconditionError(
            "mlp: config.json layer_sizes must be positive integers");
      }
      sizes.push_back(v.get<int64_t>());
      // Each layer's weight is sizes[i] x sizes[i+1] elements: its byte size must fit in int64.
      if (sizes.size() >= 2 && sizes[sizes.size() - 2] > INT64_MAX / 8 / sizes.back()) {
        return absl::FailedPreconditionError(
            absl::StrCat("mlp: config.json layer_sizes ", sizes[sizes.size() - 2], " x ",
                         sizes.back(), " is too large for one weight"));
      }
    }
  } else {
    // layers.0.weight [h1, in], layers.1.weight [h2, h1], ...
    for (int i = 0;; ++i) {
      const core::TensorInfo* w = index.Find(absl::StrCat("layers.", i, ".weight"));
      if (w == nullptr) break;
      if (w->shape.size() != 2) {
        return absl::FailedPreconditionError(absl::StrCat("mlp: layers.", i, ".weight is not 2-D"));
      }
      if (i == 0) sizes.push_back(w->shape[1]);
      sizes.push_back(w->shape[0]);
    }
  }
  if (sizes.size() < 2) {
    return absl::FailedPreconditionError(
        "mlp: no layer_sizes in config.json and no layers.N.weight in the checkpoint");
  }
  absl::StatusOr<std::string> configured = ConfigString(*config, "activation", "mlp", "gelu");
  if (!configured.ok()) return configured.status();
  std::string activation = *configured;
  if (activation != "gelu" && activation != "relu" && activation != "tanh" &&
      activation != "silu") {
    return absl::FailedPreconditionError(
        absl::StrCat("mlp: unknown activation '", activation, "' (gelu, relu, tanh, silu)"));
  }
  return std::unique_ptr<Model>(new Mlp(std::move(sizes), std::move(activation)));
}

}  // namespace metaload::models
