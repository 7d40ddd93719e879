#include "server/models/causal_lm.h"

#include "absl/strings/str_cat.h"

namespace metaload::models {

std::vector<EntrySpec> CausalLm::Entries() const {
  return {{"forward",
           {{"input_ids", core::DType::kInt64, {-1, -1}},
            {"attention_mask", core::DType::kInt64, {-1, -1}, /*optional=*/true}},
           {{"logits", std::nullopt, {-1, -1, options_.vocab}}}}};
}

absl::StatusOr<NamedTensors> CausalLm::Forward(
    const std::string&, const std::map<std::string, at::Tensor>& inputs) const {
  const at::Tensor& ids = inputs.at("input_ids");
  const int64_t t = ids.size(1);
  if (t > options_.max_positions) {
    return absl::InvalidArgumentError(absl::StrCat("input_ids: ", t, " tokens, more than ",
                                                   options_.positions_key, " ",
                                                   options_.max_positions));
  }
  auto mask_it = inputs.find("attention_mask");
  const at::Tensor mask = mask_it == inputs.end() ? at::Tensor() : mask_it->second;
  if (mask.defined() && !mask.sizes().equals(ids.sizes())) {
    return absl::InvalidArgumentError("attention_mask must have the shape of input_ids");
  }
  return NamedTensors{{"logits", Logits(ids, mask)}};
}

}  // namespace metaload::models
