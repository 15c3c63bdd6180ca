// Shared pieces of the C++ autograd kernels (the torchvision pattern): each
// forward op is a torch::autograd::Function whose forward redispatches below
// Autograd and whose backward calls the backward op through the dispatcher,
// so that a Python call reaches the kernel with no Python frame in between.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>

#include <string>

namespace sit_ext::autograd {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The typed handle of sit_ext::<name>, looked up once.
template <typename Signature>
c10::TypedOperatorHandle<Signature> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// `grad` where the caller asked for it, undefined elsewhere (the backward ops
// return empty tensors for gradients they were not asked for).
inline at::Tensor if_needed(bool needed, const at::Tensor& grad) {
  return needed ? grad : at::Tensor();
}

// The backward ops have no derivative of their own: a double backward through
// one (create_graph=True, then differentiating the gradient) raises instead of
// silently dropping their part of the second derivative.
[[noreturn]] inline void refuse_double_backward(const char* op) {
  const std::string name(op);
  TORCH_CHECK(false, "sit_ext.", name.substr(0, name.size() - std::string("_backward").size()),
              ": second-order gradients through the fused op are not supported (a double backward "
              "reached sit_ext::",
              name,
              "); build the model with fused=False, or use the functions of sit_ext.reference, for "
              "gradient penalties and Hessian-vector products");
}

}  // namespace sit_ext::autograd

namespace sit_ext::autograd {

// The Autograd kernel of a backward op `Op` (a struct with kName and a static
// `call` returning its outputs as a variable_list): the op itself, recorded as
// a node whose backward refuses when a double backward can reach it.
template <typename Op>
struct RefuseDoubleBackward : torch::autograd::Function<RefuseDoubleBackward<Op>> {
  template <typename... Args>
  static variable_list forward(AutogradContext*, const Args&... args) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return Op::call(args...);
  }
  static variable_list backward(AutogradContext*, const variable_list&) {
    refuse_double_backward(Op::kName);
  }
};

template <typename Op, typename... Args>
variable_list backward_op(const Args&... args) {
  if (!c10::GradMode::is_enabled()) {
    // The usual backward pass (no create_graph): nothing to record.
    at::AutoDispatchBelowADInplaceOrView guard;
    return Op::call(args...);
  }
  return RefuseDoubleBackward<Op>::apply(args...);
}

}  // namespace sit_ext::autograd
