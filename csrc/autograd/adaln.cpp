// Autograd kernels of the AdaLN-Zero family: ln_modulate,
// gated_residual_ln_modulate, gated_residual.
#include <torch/library.h>

#include "autograd_utils.h"

namespace sit_ext::autograd {
namespace {

using at::Tensor;

// ---- the backward ops, as Autograd kernels that refuse a double backward

struct LnModulateBackwardOp {
  static constexpr const char* kName = "ln_modulate_backward";
  static variable_list call(const Tensor& grad_y, const Tensor& x, const Tensor& scale,
                            const Tensor& mean, const Tensor& rstd, std::array<bool, 3> mask) {
    static const auto op = typed_op<std::tuple<Tensor, Tensor, Tensor>(
        const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
        std::array<bool, 3>)>("sit_ext::ln_modulate_backward");
    auto [dx, dshift, dscale] = op.call(grad_y, x, scale, mean, rstd, mask);
    return {dx, dshift, dscale};
  }
};

using GrlmBackwardSignature = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const std::optional<Tensor>&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const Tensor&, const Tensor&, const Tensor&, std::array<bool, 6>, const std::optional<Tensor>&);

struct GatedResidualLnModulateBackwardOp {
  static constexpr const char* kName = "gated_residual_ln_modulate_backward";
  static variable_list call(const std::optional<Tensor>& grad_x_out, const Tensor& grad_y,
                            const Tensor& x_out, const Tensor& h, const Tensor& gate,
                            const Tensor& scale, const Tensor& mean, const Tensor& rstd,
                            std::array<bool, 6> mask, const std::optional<Tensor>& bias) {
    static const auto op =
        typed_op<GrlmBackwardSignature>("sit_ext::gated_residual_ln_modulate_backward");
    auto [dx, dh, dgate, dshift, dscale, dbias] =
        op.call(grad_x_out, grad_y, x_out, h, gate, scale, mean, rstd, mask, bias);
    return {dx, dh, dgate, dshift, dscale, dbias};
  }
};

struct GatedResidualBackwardOp {
  static constexpr const char* kName = "gated_residual_backward";
  static variable_list call(const Tensor& grad, const Tensor& h, const Tensor& gate,
                            std::array<bool, 2> mask) {
    static const auto op = typed_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&,
                                                               const Tensor&, std::array<bool, 2>)>(
        "sit_ext::gated_residual_backward");
    auto [dh, dgate] = op.call(grad, h, gate, mask);
    return {dh, dgate};
  }
};

// The gradients of x + gate h: the incoming one for x, (dh, dgate) from the kernel.
variable_list gated_residual_grads(AutogradContext* ctx, const Tensor& grad, const Tensor& h,
                                   const Tensor& gate) {
  const bool need_x = ctx->needs_input_grad(0), need_h = ctx->needs_input_grad(1),
             need_gate = ctx->needs_input_grad(2);
  variable_list g = {if_needed(need_x, grad), Tensor(), Tensor()};
  if (need_h || need_gate) {
    const auto dhg =
        backward_op<GatedResidualBackwardOp>(grad, h, gate, std::array<bool, 2>{need_h, need_gate});
    g[1] = if_needed(need_h, dhg[0]);
    g[2] = if_needed(need_gate, dhg[1]);
  }
  return g;
}

// ---- the forward ops

using LnModulateSignature = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&,
                                                               const Tensor&, double,
                                                               std::optional<at::ScalarType>);

struct LnModulate : torch::autograd::Function<LnModulate> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& shift,
                               const Tensor& scale, double eps,
                               std::optional<at::ScalarType> out_dtype) {
    static const auto op = typed_op<LnModulateSignature>("sit_ext::ln_modulate");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, rstd] = op.call(x, shift, scale, eps, out_dtype);
    ctx->save_for_backward({x, scale, mean, rstd});
    ctx->mark_non_differentiable({mean, rstd});
    return {y, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    const auto s = ctx->get_saved_variables();
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      ctx->needs_input_grad(2)};
    const auto g = backward_op<LnModulateBackwardOp>(grads[0], s[0], s[1], s[2], s[3], mask);
    return {if_needed(mask[0], g[0]), if_needed(mask[1], g[1]), if_needed(mask[2], g[2]), Tensor(),
            Tensor()};
  }
};

using GrlmSignature = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&,
                                                                 const Tensor&, const Tensor&,
                                                                 const Tensor&, double,
                                                                 std::optional<at::ScalarType>,
                                                                 const std::optional<Tensor>&);

struct GatedResidualLnModulate : torch::autograd::Function<GatedResidualLnModulate> {
  static constexpr size_t kArgs = 8;  // x, h, gate, shift, scale, eps, out_dtype, bias

  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& h,
                               const Tensor& gate, const Tensor& shift, const Tensor& scale,
                               double eps, std::optional<at::ScalarType> out_dtype,
                               const std::optional<Tensor>& bias) {
    static const auto op = typed_op<GrlmSignature>("sit_ext::gated_residual_ln_modulate");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [x_out, y, mean, rstd] = op.call(x, h, gate, shift, scale, eps, out_dtype, bias);
    const bool has_bias = bias.has_value() && bias->defined();
    ctx->save_for_backward({x_out, h, gate, scale, mean, rstd, has_bias ? *bias : Tensor()});
    ctx->mark_non_differentiable({mean, rstd});
    ctx->set_materialize_grads(false);
    return {x_out, y, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    const auto s = ctx->get_saved_variables();
    const Tensor &grad_x_out = grads[0], &grad_y = grads[1], &bias = s[6];
    // The bias, when given, is the sixth tensor input (edges count tensors only).
    const bool need_bias = bias.defined() && ctx->needs_input_grad(5);
    variable_list out(kArgs);
    if (!grad_y.defined()) {
      // Only the residual stream was used: the LayerNorm branch passes nothing.
      if (!grad_x_out.defined()) return out;
      if (!bias.defined()) {
        auto g = gated_residual_grads(ctx, grad_x_out, s[1], s[2]);
        std::copy(g.begin(), g.end(), out.begin());
        return out;
      }
      // x + gate (h + bias): the plain residual's gradients with h + bias, and
      // dbias the column sums of dh (a path the model never takes).
      const bool need_h = ctx->needs_input_grad(1), need_gate = ctx->needs_input_grad(2);
      out[0] = if_needed(ctx->needs_input_grad(0), grad_x_out);
      if (need_h || need_gate || need_bias) {
        const auto dhg = backward_op<GatedResidualBackwardOp>(
            grad_x_out, s[1].add(bias), s[2], std::array<bool, 2>{need_h || need_bias, need_gate});
        out[1] = if_needed(need_h, dhg[0]);
        out[2] = if_needed(need_gate, dhg[1]);
        if (need_bias) out[7] = dhg[0].reshape({-1, dhg[0].size(-1)}).sum(0);
      }
      return out;
    }
    const std::array<bool, 6> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      ctx->needs_input_grad(2), ctx->needs_input_grad(3),
                                      ctx->needs_input_grad(4), need_bias};
    std::optional<Tensor> gxo, bias_arg;
    if (grad_x_out.defined()) gxo = grad_x_out;
    if (bias.defined()) bias_arg = bias;
    const auto g = backward_op<GatedResidualLnModulateBackwardOp>(gxo, grad_y, s[0], s[1], s[2],
                                                                  s[3], s[4], s[5], mask, bias_arg);
    for (size_t i = 0; i < 5; ++i) out[i] = if_needed(mask[i], g[i]);
    out[7] = if_needed(need_bias, g[5]);
    return out;
  }
};

struct GatedResidual : torch::autograd::Function<GatedResidual> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& h,
                        const Tensor& gate) {
    static const auto op =
        typed_op<Tensor(const Tensor&, const Tensor&, const Tensor&)>("sit_ext::gated_residual");
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor out = op.call(x, h, gate);
    ctx->save_for_backward({h, gate});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    const auto s = ctx->get_saved_variables();
    return gated_residual_grads(ctx, grads[0], s[0], s[1]);
  }
};

std::tuple<Tensor, Tensor, Tensor> ln_modulate(const Tensor& x, const Tensor& shift,
                                               const Tensor& scale, double eps,
                                               std::optional<at::ScalarType> out_dtype) {
  const auto o = LnModulate::apply(x, shift, scale, eps, out_dtype);
  return {o[0], o[1], o[2]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> gated_residual_ln_modulate(
    const Tensor& x, const Tensor& h, const Tensor& gate, const Tensor& shift, const Tensor& scale,
    double eps, std::optional<at::ScalarType> out_dtype, const std::optional<Tensor>& bias) {
  const auto o = GatedResidualLnModulate::apply(x, h, gate, shift, scale, eps, out_dtype, bias);
  return {o[0], o[1], o[2], o[3]};
}

Tensor gated_residual(const Tensor& x, const Tensor& h, const Tensor& gate) {
  return GatedResidual::apply(x, h, gate);
}

std::tuple<Tensor, Tensor, Tensor> ln_modulate_backward(const Tensor& grad_y, const Tensor& x,
                                                        const Tensor& scale, const Tensor& mean,
                                                        const Tensor& rstd,
                                                        std::array<bool, 3> mask) {
  const auto g = backward_op<LnModulateBackwardOp>(grad_y, x, scale, mean, rstd, mask);
  return {g[0], g[1], g[2]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gated_residual_ln_modulate_backward(
    const std::optional<Tensor>& grad_x_out, const Tensor& grad_y, const Tensor& x_out,
    const Tensor& h, const Tensor& gate, const Tensor& scale, const Tensor& mean,
    const Tensor& rstd, std::array<bool, 6> mask, const std::optional<Tensor>& bias) {
  const auto g = backward_op<GatedResidualLnModulateBackwardOp>(grad_x_out, grad_y, x_out, h, gate,
                                                                scale, mean, rstd, mask, bias);
  return {g[0], g[1], g[2], g[3], g[4], g[5]};
}

std::tuple<Tensor, Tensor> gated_residual_backward(const Tensor& grad, const Tensor& h,
                                                   const Tensor& gate, std::array<bool, 2> mask) {
  const auto g = backward_op<GatedResidualBackwardOp>(grad, h, gate, mask);
  return {g[0], g[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(sit_ext, Autograd, m) {
  m.impl("ln_modulate", &ln_modulate);
  m.impl("ln_modulate_backward", &ln_modulate_backward);
  m.impl("gated_residual_ln_modulate", &gated_residual_ln_modulate);
  m.impl("gated_residual_ln_modulate_backward", &gated_residual_ln_modulate_backward);
  m.impl("gated_residual", &gated_residual);
  m.impl("gated_residual_backward", &gated_residual_backward);
}

}  // namespace sit_ext::autograd
