// Autograd kernel of the MLP family: gelu_mlp.
#include <torch/library.h>

#include "autograd_utils.h"

namespace sit_ext::autograd {
namespace {

using at::Tensor;

using GeluMlpSignature = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&,
                                                            const Tensor&, const Tensor&,
                                                            const std::optional<Tensor>&);

struct GeluMlpBackwardOp {
  static constexpr const char* kName = "gelu_mlp_backward";
  static variable_list call(const Tensor& grad, const Tensor& x, const Tensor& w1, const Tensor& w2,
                            const Tensor& act, const Tensor& pre, std::array<bool, 5> mask) {
    static const auto op = typed_op<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
        const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
        std::array<bool, 5>)>("sit_ext::gelu_mlp_backward");
    auto [dx, dw1, db1, dw2, db2] = op.call(grad, x, w1, w2, act, pre, mask);
    return {dx, dw1, db1, dw2, db2};
  }
};

struct GeluMlp : torch::autograd::Function<GeluMlp> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& w1,
                               const Tensor& b1, const Tensor& w2,
                               const std::optional<Tensor>& b2) {
    static const auto op = typed_op<GeluMlpSignature>("sit_ext::gelu_mlp");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, act, pre] = op.call(x, w1, b1, w2, b2);
    ctx->save_for_backward({x, w1, w2, act, pre});
    ctx->saved_data["has_b2"] = b2.has_value() && b2->defined();
    ctx->mark_non_differentiable({act, pre});
    ctx->set_materialize_grads(false);
    return {out, act, pre};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    variable_list out(5);  // x, w1, b1, w2, b2
    if (!grads[0].defined()) return out;
    const auto s = ctx->get_saved_variables();
    // b2, when given, is the fifth tensor input (edges count tensors only).
    const std::array<bool, 5> mask = {
        ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2),
        ctx->needs_input_grad(3), ctx->saved_data["has_b2"].toBool() && ctx->needs_input_grad(4)};
    const auto g = backward_op<GeluMlpBackwardOp>(grads[0], s[0], s[1], s[2], s[3], s[4], mask);
    for (size_t i = 0; i < 5; ++i) out[i] = if_needed(mask[i], g[i]);
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor> gelu_mlp(const Tensor& x, const Tensor& w1, const Tensor& b1,
                                            const Tensor& w2, const std::optional<Tensor>& b2) {
  const auto o = GeluMlp::apply(x, w1, b1, w2, b2);
  return {o[0], o[1], o[2]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gelu_mlp_backward(
    const Tensor& grad, const Tensor& x, const Tensor& w1, const Tensor& w2, const Tensor& act,
    const Tensor& pre, std::array<bool, 5> mask) {
  const auto g = backward_op<GeluMlpBackwardOp>(grad, x, w1, w2, act, pre, mask);
  return {g[0], g[1], g[2], g[3], g[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(sit_ext, Autograd, m) {
  m.impl("gelu_mlp", &gelu_mlp);
  m.impl("gelu_mlp_backward", &gelu_mlp_backward);
}

}  // namespace sit_ext::autograd
