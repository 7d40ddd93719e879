// MetaModuleModel: the base of every architecture built from the layer kit, and the only way
// such an architecture gets its module tree. BuildModule<Net>(args...) constructs the tree under
// core::InitializeOnMeta (every parameter and buffer a meta tensor: zero bytes, zero init time,
// the loader fills them) and installs it; ModuleModel::SetModule is private here, so no
// subclass can install a tree built without the guard. BuildOnMeta<M> is the guard alone.
//
// Ownership: the model owns the tree; the reference BuildModule returns lives as long as the
// model. Thread-safety: as ModuleModel (built and loaded by one thread, then Run from any).
#ifndef METALOAD_SERVER_MODELS_META_MODULE_MODEL_H_
#define METALOAD_SERVER_MODELS_META_MODULE_MODEL_H_

#include <memory>
#include <utility>

#include "server/core/init_context.h"
#include "server/models/module_model.h"

namespace metaload::models {

// `M(args...)` with every tensor the layer kit allocates on meta.
template <typename M, typename... Args>
std::unique_ptr<M> BuildOnMeta(Args&&... args) {
  core::InitializeOnMeta meta;
  return std::make_unique<M>(std::forward<Args>(args)...);
}

class MetaModuleModel : public ModuleModel {
 public:
  // True while every parameter and buffer is a meta tensor: from construction until Load.
  // RegistryTest checks it for every architecture, before loading.
  bool AllOnMeta() const {
    for (const core::TensorSlot& slot : module().Slots()) {
      if (!slot.tensor->is_meta()) return false;
    }
    return true;
  }

 protected:
  // Call once, from the subclass's constructor.
  template <typename Net, typename... Args>
  Net& BuildModule(Args&&... args) {
    std::unique_ptr<Net> net = BuildOnMeta<Net>(std::forward<Args>(args)...);
    Net& ref = *net;
    SetModule(std::move(net));
    return ref;
  }

 private:
  using ModuleModel::SetModule;  // only through BuildModule
};

}  // namespace metaload::models

#endif  // METALOAD_SERVER_MODELS_META_MODULE_MODEL_H_
