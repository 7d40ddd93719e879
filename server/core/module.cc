#include "server/core/module.h"

#include <ATen/ATen.h>

#include "server/core/init_context.h"

namespace metaload::core {
namespace {

at::Tensor Allocate(const std::vector<int64_t>& shape, at::ScalarType dtype,
                    const Module::InitFn& init) {
  const InitState state = CurrentInitState();
  if (state.on_meta) return at::empty(shape, at::TensorOptions().dtype(dtype).device(at::kMeta));
  at::Tensor t = at::empty(shape, at::TensorOptions().dtype(dtype));
  if (!state.initialization_disabled && init) init(t);
  return t;
}

}  // namespace

at::Tensor& Module::AddParameter(std::string name, std::vector<int64_t> shape, InitFn init,
                                 at::ScalarType dtype) {
  tensors_.push_back({std::move(name), Allocate(shape, dtype, init), false});
  return tensors_.back().tensor;
}

at::Tensor& Module::AddBuffer(std::string name, std::vector<int64_t> shape, InitFn init,
                              at::ScalarType dtype) {
  tensors_.push_back({std::move(name), Allocate(shape, dtype, init), true});
  return tensors_.back().tensor;
}

void Module::CollectSlots(const std::string& prefix, std::vector<TensorSlot>* out) {
  for (Entry& e : tensors_) out->push_back({prefix + e.name, &e.tensor, e.is_buffer});
  for (auto& [name, child] : children_) child->CollectSlots(prefix + name + ".", out);
}

std::vector<TensorSlot> Module::Slots() {
  std::vector<TensorSlot> out;
  CollectSlots("", &out);
  return out;
}

void Module::SetComputeDtype(const std::string& prefix, at::ScalarType dtype) {
  SetComputeDtypeUnder("", prefix, dtype);
}

// `name` is this module's dotted name plus "." ("" for the root).
void Module::SetComputeDtypeUnder(const std::string& name, const std::string& prefix,
                                  at::ScalarType dtype) {
  const bool under = name.compare(0, prefix.size(), prefix) == 0;
  if (!under && prefix.compare(0, name.size(), name) != 0) return;  // disjoint subtree
  if (under) compute_dtype_ = dtype;
  for (auto& [child_name, child] : children_) {
    child->SetComputeDtypeUnder(name + child_name + ".", prefix, dtype);
  }
}

at::Tensor Module::Weight(const at::Tensor& stored) const {
  if (!compute_dtype_ || stored.scalar_type() == *compute_dtype_ ||
      !at::isFloatingType(stored.scalar_type())) {
    return stored;
  }
  return stored.to(*compute_dtype_);
}

int64_t Module::ParameterCount() {
  int64_t total = 0;
  for (const TensorSlot& s : Slots()) {
    if (!s.is_buffer) total += s.tensor->numel();
  }
  return total;
}

}  // namespace metaload::core
