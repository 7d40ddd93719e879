// The module base of metaload's layer kit: a tree of named parameters and buffers, built
// through the init context (init_context.h), so that under InitializeOnMeta a whole model costs
// zero bytes and zero init time.
//
// Why not torch::nn::Module: its constructors allocate and initialise on CPU, and in LibTorch
// 1.13 a registered meta parameter cannot be given real data (set_data refuses "incompatible
// tensor type") nor a buffer be replaced (the registry is private). Here every tensor lives in
// a slot with a stable address; the loader swaps a slot's tensor, and layers read their weights
// through their slots at every forward, never through a stale copy.
//
// Storage and compute: a weight is stored in the dtype the load's policy chose (float16 to halve
// memory, say), and each module computes in its compute dtype, set once after loading
// (SetComputeDtype). Layers read their weights through Weight(), which casts a stored weight to
// the compute dtype at every forward when the two differ, as the web UIs' "manual cast" does;
// the cast copy lives only for that forward, in memory reused across forwards (weight_cast.h).
// So any storage mix runs wherever the compute dtype has kernels (float32 on a CPU), and its
// values are those of the compute dtype applied to the stored (rounded) weights, whatever the
// CPU's instruction set.
//
// float8 storage: LibTorch 1.13 has no float8 type, so a float8 weight is a kByte tensor whose
// slot carries its format (TensorSlot::float8). Only Weight() and InComputeDtype() decode it,
// so only tensors registered with AddWeight may hold float8; the loader sets the tag.
//
// A module owns its children. Not thread-safe while being built or loaded; forward passes on a
// loaded module may run concurrently (they only read the slots and the compute dtype).
#ifndef METALOAD_SERVER_CORE_MODULE_H_
#define METALOAD_SERVER_CORE_MODULE_H_

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "server/core/dtype.h"
#include "server/core/dtype_policy.h"

namespace metaload::core {

// One parameter or buffer of a module tree, addressed by its full dotted name.
struct TensorSlot {
  std::string name;
  at::Tensor* tensor;  // owned by the module; stable for the module's lifetime
  bool is_buffer;
  TensorUse use;
  // Set when *tensor holds float8 values (as kByte): their format. Owned by the module.
  std::optional<DType>* float8;
};

class Module {
 public:
  // Fills a freshly allocated CPU tensor (only called when initialisation is enabled).
  using InitFn = std::function<void(at::Tensor&)>;

  virtual ~Module() = default;

  // Every parameter and buffer of this module and its descendants, in registration order,
  // named "child.grandchild.weight".
  std::vector<TensorSlot> Slots();
  int64_t ParameterCount();

  // Sets the compute dtype of every module whose dotted name (this one is "") falls under
  // `prefix` ("" = all; "unet." covers "unet", "unet.down.0", ...). Call after loading, before
  // any forward.
  void SetComputeDtype(const std::string& prefix, at::ScalarType dtype);
  // Unset (std::nullopt): weights are used as stored.
  std::optional<at::ScalarType> compute_dtype() const { return compute_dtype_; }

 protected:
  // Allocates through the init context: a meta tensor under InitializeOnMeta, otherwise an
  // uninitialised CPU tensor that `init` fills unless DisableInitialization is active.
  at::Tensor& AddParameter(std::string name, std::vector<int64_t> shape, InitFn init,
                           at::ScalarType dtype = at::kFloat);
  at::Tensor& AddBuffer(std::string name, std::vector<int64_t> shape, InitFn init,
                        at::ScalarType dtype = at::kFloat);
  // A parameter whose values this module reads only through Weight() or, after a gather,
  // InComputeDtype() (kWeight or kMatmulWeight, see TensorUse), which may therefore be stored as
  // float8.
  at::Tensor& AddWeight(std::string name, std::vector<int64_t> shape, InitFn init, TensorUse use);

  // `stored` as this module computes with it: decoded when it is one of this module's float8
  // weights, cast to the compute dtype when it is a floating tensor of another dtype, otherwise
  // `stored` itself (no copy). float8 decodes to float32 when no compute dtype is set.
  at::Tensor Weight(const at::Tensor& stored) const;
  // A result computed from stored values without a floating input (an embedding lookup) in
  // the compute dtype; `from` is the weight it was computed from, whose float8 format applies.
  at::Tensor InComputeDtype(const at::Tensor& result, const at::Tensor& from) const;

  template <typename M>
  M& AddChild(std::string name, std::unique_ptr<M> child) {
    M& ref = *child;
    children_.emplace_back(std::move(name), std::move(child));
    return ref;
  }

 private:
  struct Entry {
    std::string name;
    at::Tensor tensor;
    bool is_buffer;
    TensorUse use;
    std::optional<DType> float8;
  };
  // The float8 format of `t` when it is one of this module's tensors holding float8.
  std::optional<DType> Float8Of(const at::Tensor& t) const;
  at::Tensor Cast(const at::Tensor& stored, std::optional<DType> float8) const;
  void CollectSlots(const std::string& prefix, std::vector<TensorSlot>* out);
  void SetComputeDtypeUnder(const std::string& name, const std::string& prefix,
                            at::ScalarType dtype);

  std::deque<Entry> tensors_;  // deque: growing it never moves existing slots
  std::vector<std::pair<std::string, std::unique_ptr<Module>>> children_;
  std::optional<at::ScalarType> compute_dtype_;
};

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_MODULE_H_
