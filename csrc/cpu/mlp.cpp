// The MLP family on the CPU (gelu_mlp): ATen's GEMMs and tanh GELU, called
// from C++ (the same arithmetic as eager fc1, GELU, fc2). The functions here
// take tensors on any device: the CUDA kernel falls back to them where
// cuBLASLt's epilogues do not apply.
#include "sit_ext/mlp.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace sit_ext {

at::Tensor mlp_fc2(const MlpArgs& a, const at::Tensor& act) {
  return a.b2.defined() ? at::addmm(a.b2, act, a.w2.t()) : at::mm(act, a.w2.t());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gelu_mlp_aten(const MlpArgs& a) {
  at::Tensor pre = at::addmm(a.b1, a.x2, a.w1.t());
  at::Tensor act = at::gelu(pre, "tanh");
  return {mlp_fc2(a, act), act, pre};
}

std::array<at::Tensor, 5> gelu_mlp_backward_aten(const MlpArgs& a, const at::Tensor& grad2,
                                                 const at::Tensor& act, const at::Tensor& pre,
                                                 std::array<bool, 5> mask, at::Tensor d_pre,
                                                 at::Tensor db1) {
  const bool need_pre = mask[0] || mask[1] || mask[2];
  if (need_pre && !d_pre.defined()) {
    d_pre = at::gelu_backward(at::mm(grad2, a.w2), pre, "tanh");
  }
  if (mask[2] && !db1.defined()) db1 = d_pre.sum(0);
  return {mask[0] ? at::mm(d_pre, a.w1) : unasked(a.x2),
          mask[1] ? at::mm(d_pre.t(), a.x2) : unasked(a.w1), mask[2] ? db1 : unasked(a.w1),
          mask[3] ? at::mm(grad2.t(), act) : unasked(a.w2), mask[4] ? grad2.sum(0) : unasked(a.w2)};
}

namespace cpu {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor> gelu_mlp(const Tensor& x, const Tensor& w1, const Tensor& b1,
                                            const Tensor& w2, const std::optional<Tensor>& b2) {
  const MlpArgs a = mlp_args("gelu_mlp", x, w1, b1, w2, b2);
  auto [out, act, pre] = gelu_mlp_aten(a);
  return mlp_outputs(x, a, out, act, pre);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gelu_mlp_backward(
    const Tensor& grad, const Tensor& x, const Tensor& w1, const Tensor& w2, const Tensor& act,
    const Tensor& pre, std::array<bool, 5> mask) {
  const auto [a, grad2] = mlp_backward_args("gelu_mlp_backward", grad, x, w1, w2, act, pre);
  return mlp_grads(x, gelu_mlp_backward_aten(a, grad2, act, pre, mask), mask[0]);
}

}  // namespace

TORCH_LIBRARY_IMPL(sit_ext, CPU, m) {
  m.impl("gelu_mlp", &gelu_mlp);
  m.impl("gelu_mlp_backward", &gelu_mlp_backward);
}

}  // namespace cpu
}  // namespace sit_ext
