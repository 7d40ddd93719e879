// What a model's entries (forward functions) take and give, without LibTorch types, so the
// service can describe models without including ATen.
#ifndef METALOAD_SERVER_MODELS_ENTRY_SPEC_H_
#define METALOAD_SERVER_MODELS_ENTRY_SPEC_H_

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "server/core/dtype.h"

namespace metaload::models {

struct TensorSpec {
  std::string name;
  std::optional<core::DType> dtype;  // nullopt: the model's floating dtype, whatever it is
  std::vector<int64_t> shape;        // -1 = any size
  bool optional = false;
};

// How a load's networks compute (how their weights are stored is the load's dtype policy).
struct ComputeChoice {
  // Every network; nullopt: core::DefaultComputeDtype of its storage dtype on its device.
  std::optional<core::DType> dtype;
  // Entry name -> the dtype of that entry's network, over `dtype` (entries that run one
  // network, such as SD's vae_decode and vae_encode, must agree).
  std::map<std::string, core::DType> by_entry;
};

struct EntrySpec {
  std::string name;
  std::vector<TensorSpec> inputs;
  std::vector<TensorSpec> outputs;
  // Once loaded (Model::LoadedEntries): the dtype most of the entry's network is stored in and
  // the one it computes in; nullopt where the model cannot tell (TorchScript).
  std::optional<core::DType> storage_dtype = std::nullopt;
  std::optional<core::DType> compute_dtype = std::nullopt;
};

}  // namespace metaload::models

#endif  // METALOAD_SERVER_MODELS_ENTRY_SPEC_H_
