#include "server/core/module.h"

#include <ATen/ATen.h>

#include "server/core/init_context.h"
#include "server/core/weight_cast.h"

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
  tensors_.push_back(
      {std::move(name), Allocate(shape, dtype, init), false, TensorUse::kDirect, std::nullopt});
  return tensors_.back().tensor;
}

at::Tensor& Module::AddBuffer(std::string name, std::vector<int64_t> shape, InitFn init,
                              at::ScalarType dtype) {
  tensors_.push_back(
      {std::move(name), Allocate(shape, dtype, init), true, TensorUse::kDirect, std::nullopt});
  return tensors_.back().tensor;
}

at::Tensor& Module::AddWeight(std::string name, std::vector<int64_t> shape, InitFn init,
                              TensorUse use) {
  tensors_.push_back(
      {std::move(name), Allocate(shape, at::kFloat, init), false, use, std::nullopt});
  return tensors_.back().tensor;
}

void Module::CollectSlots(const std::string& prefix, std::vector<TensorSlot>* out) {
  for (Entry& e : tensors_) {
    out->push_back({prefix + e.name, &e.tensor, e.is_buffer, e.use, &e.float8});
  }
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

std::optional<DType> Module::Float8Of(const at::Tensor& t) const {
  for (const Entry& e : tensors_) {
    if (&e.tensor == &t) return e.float8;  // a handful of entries per module
  }
  return std::nullopt;
}

at::Tensor Module::Cast(const at::Tensor& stored, std::optional<DType> float8) const {
  if (float8) return DecodeWeight(stored, *float8, compute_dtype_.value_or(at::kFloat));
  if (!compute_dtype_ || stored.scalar_type() == *compute_dtype_ ||
      !at::isFloatingType(stored.scalar_type())) {
    return stored;
  }
  return CastWeight(stored, *compute_dtype_);
}

at::Tensor Module::Weight(const at::Tensor& stored) const { return Cast(stored, Float8Of(stored)); }

at::Tensor Module::InComputeDtype(const at::Tensor& result, const at::Tensor& from) const {
  return Cast(result, Float8Of(from));
}

int64_t Module::ParameterCount() {
  int64_t total = 0;
  for (const TensorSlot& s : Slots()) {
    if (!s.is_buffer) total += s.tensor->numel();
  }
  return total;
}

}  // namespace metaload::core
