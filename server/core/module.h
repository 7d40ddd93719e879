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
// A module owns its children. Not thread-safe while being built or loaded; forward passes on a
// loaded module may run concurrently (they only read the slots).
#ifndef METALOAD_SERVER_CORE_MODULE_H_
#define METALOAD_SERVER_CORE_MODULE_H_

#include <ATen/core/Tensor.h>

#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace metaload::core {

// One parameter or buffer of a module tree, addressed by its full dotted name.
struct TensorSlot {
  std::string name;
  at::Tensor* tensor;  // owned by the module; stable for the module's lifetime
  bool is_buffer;
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

 protected:
  // Allocates through the init context: a meta tensor under InitializeOnMeta, otherwise an
  // uninitialised CPU tensor that `init` fills unless DisableInitialization is active.
  at::Tensor& AddParameter(std::string name, std::vector<int64_t> shape, InitFn init,
                           at::ScalarType dtype = at::kFloat);
  at::Tensor& AddBuffer(std::string name, std::vector<int64_t> shape, InitFn init,
                        at::ScalarType dtype = at::kFloat);

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
  };
  void CollectSlots(const std::string& prefix, std::vector<TensorSlot>* out);

  std::deque<Entry> tensors_;  // deque: growing it never moves existing slots
  std::vector<std::pair<std::string, std::unique_ptr<Module>>> children_;
};

}  // namespace metaload::core

#endif  // METALOAD_SERVER_CORE_MODULE_H_
