#include "server/cache/infer_call.h"

#include <ATen/core/Tensor.h>

#include <map>

#include "absl/strings/str_cat.h"
#include "server/cache/tensor_codec.h"
#include "server/core/exception_boundary.h"
#include "server/models/model.h"

namespace metaload::cache {

absl::StatusOr<std::vector<WireTensor>> RunInfer(const models::Model& model,
                                                 const std::string& entry,
                                                 std::vector<WireTensor> inputs, bool typed_outputs,
                                                 const std::string& what) {
  return core::CatchExceptions(what, [&]() -> absl::StatusOr<std::vector<WireTensor>> {
    std::map<std::string, at::Tensor> feed;
    for (const WireTensor& w : inputs) {
      absl::StatusOr<at::Tensor> t = DecodeTensor(w);
      if (!t.ok()) return t.status();
      if (!feed.emplace(w.name, *t).second) {
        return absl::InvalidArgumentError(absl::StrCat("input '", w.name, "' given twice"));
      }
    }
    inputs.clear();  // decoding copied the bytes: free the wire copy before computing
    absl::StatusOr<models::NamedTensors> out = model.Run(entry, feed);
    if (!out.ok()) return out.status();
    std::vector<WireTensor> wire;
    for (const auto& [name, tensor] : *out) {
      absl::StatusOr<WireTensor> encoded = EncodeTensor(name, tensor, typed_outputs);
      if (!encoded.ok()) return encoded.status();
      wire.push_back(*std::move(encoded));
    }
    return wire;
  });
}

}  // namespace metaload::cache
