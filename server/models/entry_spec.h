// What a model's entries (forward functions) take and give, without LibTorch types, so the
// service can describe models without including ATen.
#ifndef METALOAD_SERVER_MODELS_ENTRY_SPEC_H_
#define METALOAD_SERVER_MODELS_ENTRY_SPEC_H_

#include <cstdint>
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

struct EntrySpec {
  std::string name;
  std::vector<TensorSpec> inputs;
  std::vector<TensorSpec> outputs;
  // Once loaded (Model::LoadedEntries): the dtype most of the entry's network is stored in and
  // the one it computes in; nullopt where the model cannot tell (TorchScript).
  std::optional<core::DType> storage_dtype;
  std::optional<core::DType> compute_dtype;
};

}  // namespace metaload::models

#endif  // METALOAD_SERVER_MODELS_ENTRY_SPEC_H_
