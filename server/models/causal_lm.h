// CausalLm: the entry every causal language model shares (gpt2, llama):
//
//   "forward": input_ids [B, T] int64, optional attention_mask [B, T] int64 (1 attend, 0 pad)
//              -> logits [B, T, vocab] in the model's compute dtype
//
// It checks what the entry spec cannot (T within the model's positions, the mask's shape) and
// leaves the network to the architecture's Logits. Internal to server/models.
//
// Thread-safety: as ModuleModel; Logits is const and may run on many threads at once.
#ifndef METALOAD_SERVER_MODELS_CAUSAL_LM_H_
#define METALOAD_SERVER_MODELS_CAUSAL_LM_H_

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "server/models/meta_module_model.h"

namespace metaload::models {

class CausalLm : public MetaModuleModel {
 public:
  struct Options {
    int64_t vocab = 0;          // logits' last dimension
    int64_t max_positions = 0;  // the longest input_ids the positions allow
    // The config.json key max_positions came from, for the message of a longer input
    // ("n_positions", "max_position_embeddings").
    const char* positions_key = "";
  };

  std::vector<EntrySpec> Entries() const final;

 protected:
  explicit CausalLm(const Options& options) : options_(options) {}

  // `ids` [B, T] with T <= max_positions, on the weights' device; `mask` undefined or [B, T].
  virtual at::Tensor Logits(const at::Tensor& ids, const at::Tensor& mask) const = 0;

 private:
  absl::StatusOr<NamedTensors> Forward(const std::string& entry,
                                       const std::map<std::string, at::Tensor>& inputs) const final;

  Options options_;
};

}  // namespace metaload::models

#endif  // METALOAD_SERVER_MODELS_CAUSAL_LM_H_
