// Autograd kernels of the interpolant family: interpolant, velocity_mse, mse.
#include <torch/library.h>

#include "autograd_utils.h"

namespace sit_ext::autograd {
namespace {

using at::Tensor;

// ---- the backward ops, as Autograd kernels that refuse a double backward

struct InterpolantBackwardOp {
  static constexpr const char* kName = "interpolant_backward";
  static variable_list call(const std::optional<Tensor>& grad_xt,
                            const std::optional<Tensor>& grad_ut, const Tensor& x,
                            const Tensor& noise, const Tensor& t, int64_t schedule,
                            std::array<bool, 3> mask) {
    static const auto op = typed_op<std::tuple<Tensor, Tensor, Tensor>(
        const std::optional<Tensor>&, const std::optional<Tensor>&, const Tensor&, const Tensor&,
        const Tensor&, int64_t, std::array<bool, 3>)>("sit_ext::interpolant_backward");
    auto [dx, dnoise, dt] = op.call(grad_xt, grad_ut, x, noise, t, schedule, mask);
    return {dx, dnoise, dt};
  }
};

struct VelocityMseBackwardOp {
  static constexpr const char* kName = "velocity_mse_backward";
  static variable_list call(const Tensor& grad, const Tensor& pred, const Tensor& x,
                            const Tensor& noise, const Tensor& t, int64_t schedule,
                            std::array<bool, 4> mask) {
    static const auto op = typed_op<std::tuple<Tensor, Tensor, Tensor, Tensor>(
        const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t,
        std::array<bool, 4>)>("sit_ext::velocity_mse_backward");
    auto [dpred, dx, dnoise, dt] = op.call(grad, pred, x, noise, t, schedule, mask);
    return {dpred, dx, dnoise, dt};
  }
};

struct MseBackwardOp {
  static constexpr const char* kName = "mse_backward";
  static variable_list call(const Tensor& grad, const Tensor& pred, const Tensor& target,
                            std::array<bool, 2> mask) {
    static const auto op = typed_op<std::tuple<Tensor, Tensor>(
        const Tensor&, const Tensor&, const Tensor&, std::array<bool, 2>)>("sit_ext::mse_backward");
    auto [dpred, dtarget] = op.call(grad, pred, target, mask);
    return {dpred, dtarget};
  }
};

// ---- the forward ops

struct Interpolant : torch::autograd::Function<Interpolant> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& noise,
                               const Tensor& t, int64_t schedule, std::array<bool, 2> outputs) {
    static const auto op =
        typed_op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, int64_t,
                                            std::array<bool, 2>)>("sit_ext::interpolant");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [xt, ut] = op.call(x, noise, t, schedule, outputs);
    ctx->save_for_backward({x, noise, t});
    ctx->saved_data["schedule"] = schedule;
    ctx->saved_data["xt"] = outputs[0];
    ctx->saved_data["ut"] = outputs[1];
    ctx->set_materialize_grads(false);
    return {xt, ut};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    // An output that was not computed (an empty tensor) passes no gradient.
    std::optional<Tensor> grad_xt, grad_ut;
    if (ctx->saved_data["xt"].toBool() && grads[0].defined()) grad_xt = grads[0];
    if (ctx->saved_data["ut"].toBool() && grads[1].defined()) grad_ut = grads[1];
    if (!grad_xt && !grad_ut) return {Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
    const auto saved = ctx->get_saved_variables();
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      ctx->needs_input_grad(2)};
    const auto g = backward_op<InterpolantBackwardOp>(
        grad_xt, grad_ut, saved[0], saved[1], saved[2], ctx->saved_data["schedule"].toInt(), mask);
    return {if_needed(mask[0], g[0]), if_needed(mask[1], g[1]), if_needed(mask[2], g[2]), Tensor(),
            Tensor()};
  }
};

struct VelocityMse : torch::autograd::Function<VelocityMse> {
  static Tensor forward(AutogradContext* ctx, const Tensor& pred, const Tensor& x,
                        const Tensor& noise, const Tensor& t, int64_t schedule) {
    static const auto op =
        typed_op<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t)>(
            "sit_ext::velocity_mse");
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor loss = op.call(pred, x, noise, t, schedule);
    ctx->save_for_backward({pred, x, noise, t});
    ctx->saved_data["schedule"] = schedule;
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    const auto saved = ctx->get_saved_variables();
    const std::array<bool, 4> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      ctx->needs_input_grad(2), ctx->needs_input_grad(3)};
    const auto g =
        backward_op<VelocityMseBackwardOp>(grads[0], saved[0], saved[1], saved[2], saved[3],
                                           ctx->saved_data["schedule"].toInt(), mask);
    return {if_needed(mask[0], g[0]), if_needed(mask[1], g[1]), if_needed(mask[2], g[2]),
            if_needed(mask[3], g[3]), Tensor()};
  }
};

struct Mse : torch::autograd::Function<Mse> {
  static Tensor forward(AutogradContext* ctx, const Tensor& pred, const Tensor& target) {
    static const auto op = typed_op<Tensor(const Tensor&, const Tensor&)>("sit_ext::mse");
    at::AutoDispatchBelowADInplaceOrView guard;
    Tensor loss = op.call(pred, target);
    ctx->save_for_backward({pred, target});
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    const auto saved = ctx->get_saved_variables();
    const std::array<bool, 2> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1)};
    const auto g = backward_op<MseBackwardOp>(grads[0], saved[0], saved[1], mask);
    return {if_needed(mask[0], g[0]), if_needed(mask[1], g[1])};
  }
};

std::tuple<Tensor, Tensor> interpolant(const Tensor& x, const Tensor& noise, const Tensor& t,
                                       int64_t schedule, std::array<bool, 2> outputs) {
  const auto out = Interpolant::apply(x, noise, t, schedule, outputs);
  return {out[0], out[1]};
}

Tensor velocity_mse(const Tensor& pred, const Tensor& x, const Tensor& noise, const Tensor& t,
                    int64_t schedule) {
  return VelocityMse::apply(pred, x, noise, t, schedule);
}

Tensor mse(const Tensor& pred, const Tensor& target) { return Mse::apply(pred, target); }

std::tuple<Tensor, Tensor, Tensor> interpolant_backward(const std::optional<Tensor>& grad_xt,
                                                        const std::optional<Tensor>& grad_ut,
                                                        const Tensor& x, const Tensor& noise,
                                                        const Tensor& t, int64_t schedule,
                                                        std::array<bool, 3> mask) {
  const auto g = backward_op<InterpolantBackwardOp>(grad_xt, grad_ut, x, noise, t, schedule, mask);
  return {g[0], g[1], g[2]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> velocity_mse_backward(
    const Tensor& grad, const Tensor& pred, const Tensor& x, const Tensor& noise, const Tensor& t,
    int64_t schedule, std::array<bool, 4> mask) {
  const auto g = backward_op<VelocityMseBackwardOp>(grad, pred, x, noise, t, schedule, mask);
  return {g[0], g[1], g[2], g[3]};
}

std::tuple<Tensor, Tensor> mse_backward(const Tensor& grad, const Tensor& pred,
                                        const Tensor& target, std::array<bool, 2> mask) {
  const auto g = backward_op<MseBackwardOp>(grad, pred, target, mask);
  return {g[0], g[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(sit_ext, Autograd, m) {
  m.impl("interpolant", &interpolant);
  m.impl("interpolant_backward", &interpolant_backward);
  m.impl("velocity_mse", &velocity_mse);
  m.impl("velocity_mse_backward", &velocity_mse_backward);
  m.impl("mse", &mse);
  m.impl("mse_backward", &mse_backward);
}

}  // namespace sit_ext::autograd
