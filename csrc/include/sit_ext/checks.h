// Argument checks shared by the CPU and CUDA implementations. Every misuse
// raises a c10::Error (RuntimeError in Python) that names the op, the argument
// and what was expected.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <array>
#include <optional>
#include <string>

#include "sit_ext/interpolant_math.h"

namespace sit_ext {

inline bool is_supported_float(at::ScalarType s) {
  return s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16;
}

inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), "sit_ext.", op, ": ", name, " is undefined");
  TORCH_CHECK(is_supported_float(t.scalar_type()), "sit_ext.", op, ": expected ", name,
              " to be a float32, float64, float16 or bfloat16 tensor, got ", t.scalar_type());
}

// b must match a in shape and device (any float dtype).
inline void check_shape_device(const char* op, const char* name_a, const at::Tensor& a,
                               const char* name_b, const at::Tensor& b) {
  check_float(op, name_b, b);
  TORCH_CHECK(b.sizes() == a.sizes(), "sit_ext.", op, ": expected ", name_b,
              " to have the shape of ", name_a, " ", a.sizes(), ", got ", b.sizes());
  TORCH_CHECK(b.device() == a.device(), "sit_ext.", op, ": expected ", name_b, " on the device of ",
              name_a, " (", a.device(), "), got ", b.device());
}

// b must match a in shape, dtype and device.
inline void check_like(const char* op, const char* name_a, const at::Tensor& a, const char* name_b,
                       const at::Tensor& b) {
  check_shape_device(op, name_a, a, name_b, b);
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), "sit_ext.", op, ": expected ", name_b,
              " to have the dtype of ", name_a, " (", a.scalar_type(), "), got ", b.scalar_type());
}

// A vector of per-sample values, shape [B] (or [B, 4] coefficients), on x's device.
inline void check_per_sample(const char* op, const char* name, const at::Tensor& v,
                             const at::Tensor& x, int64_t cols = 0) {
  check_float(op, name, v);
  TORCH_CHECK(x.dim() >= 1, "sit_ext.", op, ": expected a batch dimension, got a 0-d tensor");
  TORCH_CHECK(v.device() == x.device(), "sit_ext.", op, ": expected ", name, " on ", x.device(),
              ", got ", v.device());
  if (cols == 0) {
    TORCH_CHECK(v.dim() == 1 && v.size(0) == x.size(0), "sit_ext.", op, ": expected ", name,
                " of shape [", x.size(0), "] (one value per sample), got ", v.sizes());
  } else {
    TORCH_CHECK(v.dim() == 2 && v.size(0) == x.size(0) && v.size(1) == cols, "sit_ext.", op,
                ": expected ", name, " of shape [", x.size(0), ", ", cols, "], got ", v.sizes());
  }
}

inline FloatKind float_kind(at::ScalarType s) {
  switch (s) {
    case at::kDouble:
      return FloatKind::kDouble;
    case at::kHalf:
      return FloatKind::kHalf;
    case at::kBFloat16:
      return FloatKind::kBFloat16;
    default:
      return FloatKind::kFloat;
  }
}

// Checks `t` against the schedule and x, and describes it for the kernels.
inline TimeArg time_arg(const char* op, const at::Tensor& t, int64_t schedule,
                        const at::Tensor& x) {
  TORCH_CHECK(schedule >= 0 && schedule < kNumSchedules, "sit_ext.", op, ": unknown schedule id ",
              schedule, " (expected 0 linear, 1 cosine, 2 vp or 3 coefficients)");
  if (schedule == kCoefficients) {
    check_per_sample(op, "coefficients", t, x, 4);
    return {t.data_ptr(), t.stride(0), t.stride(1), float_kind(t.scalar_type()), schedule};
  }
  check_per_sample(op, "t", t, x);
  return {t.data_ptr(), t.stride(0), 0, float_kind(t.scalar_type()), schedule};
}

// Product of the non-batch sizes: the elements of one sample.
inline int64_t per_sample_numel(const at::Tensor& x) {
  int64_t n = 1;
  for (int64_t d = 1; d < x.dim(); ++d) n *= x.size(d);
  return n;
}

// What the interpolant-family kernels need: contiguous [B, n] views of the
// sample tensors and where to find each sample's coefficients. pred (the loss
// ops only) may have any float dtype: a model under autocast predicts in
// bfloat16 while x and noise stay float32.
struct SampleArgs {
  at::Tensor x, noise, pred;  // pred is undefined for the interpolant ops
  TimeArg time;
  int64_t rows, n;
};

inline SampleArgs sample_args(const char* op, const at::Tensor& x, const at::Tensor& noise,
                              const at::Tensor& t, int64_t schedule,
                              const at::Tensor& pred = at::Tensor()) {
  check_float(op, "x", x);
  TORCH_CHECK(x.dim() >= 1, "sit_ext.", op, ": expected x of shape [B, ...], got a 0-d tensor");
  check_like(op, "x", x, "noise", noise);
  if (pred.defined()) check_shape_device(op, "x", x, "pred", pred);
  const TimeArg time = time_arg(op, t, schedule, x);
  return {x.contiguous(), noise.contiguous(), pred.defined() ? pred.contiguous() : pred,
          time,           x.size(0),          per_sample_numel(x)};
}

// The kernels pair float64 only with float64 and take any pair of the other
// float dtypes: with float64 on one side, the other side is converted.
inline at::Tensor paired_with(const at::Tensor& v, at::ScalarType other) {
  return other == at::kDouble && v.scalar_type() != at::kDouble ? v.to(at::kDouble) : v;
}

// A gradient computed for an input that paired_with converted, back in the
// input's own dtype.
inline at::Tensor as_dtype(const at::Tensor& grad, at::ScalarType dtype) {
  return grad.scalar_type() == dtype ? grad : grad.to(dtype);
}

// The loss ops accumulate and return float32, or float64 when either side is.
inline at::ScalarType loss_acc_type(at::ScalarType a, at::ScalarType b) {
  return a == at::kDouble || b == at::kDouble ? at::kDouble : at::kFloat;
}

// The velocity-MSE arguments, with pred, x and noise in dtypes the kernels
// pair, the accumulation dtype, and the dtypes the gradients go back in.
struct LossArgs : SampleArgs {
  at::ScalarType acc, pred_dtype, x_dtype;
};

inline LossArgs loss_args(const char* op, const at::Tensor& pred, const at::Tensor& x,
                          const at::Tensor& noise, const at::Tensor& t, int64_t schedule) {
  LossArgs a{sample_args(op, x, noise, t, schedule, pred)};
  a.pred_dtype = a.pred.scalar_type();
  a.x_dtype = a.x.scalar_type();
  a.acc = loss_acc_type(a.x_dtype, a.pred_dtype);
  a.pred = paired_with(a.pred, a.acc);
  a.x = paired_with(a.x, a.acc);
  a.noise = paired_with(a.noise, a.acc);
  return a;
}

// An incoming gradient of per-sample values: shape [B], converted to the
// accumulation dtype (strides are kept; kernels read it with its stride).
inline at::Tensor per_sample_grad(const char* op, const at::Tensor& grad, const at::Tensor& x,
                                  at::ScalarType acc) {
  check_per_sample(op, "grad", grad, x);
  return grad.to(acc);
}

// An incoming gradient of a tensor output: same shape as x, made contiguous.
inline at::Tensor tensor_grad(const char* op, const char* name, const at::Tensor& grad,
                              const at::Tensor& x) {
  if (!grad.defined()) return grad;
  TORCH_CHECK(grad.sizes() == x.sizes(), "sit_ext.", op, ": expected ", name, " of shape ",
              x.sizes(), ", got ", grad.sizes());
  TORCH_CHECK(grad.device() == x.device(), "sit_ext.", op, ": expected ", name, " on ", x.device(),
              ", got ", grad.device());
  return grad.to(x.scalar_type()).contiguous();
}

inline void check_mse_args(const char* op, const at::Tensor& pred, const at::Tensor& target) {
  check_float(op, "pred", pred);
  check_shape_device(op, "pred", pred, "target", target);
}

// The upstream gradient of a scalar loss, as a 1-element tensor of dtype acc.
inline at::Tensor scalar_grad(const char* op, const at::Tensor& grad, const at::Tensor& pred,
                              at::ScalarType acc) {
  check_float(op, "grad", grad);
  TORCH_CHECK(grad.numel() == 1, "sit_ext.", op, ": expected a scalar grad, got shape ",
              grad.sizes());
  TORCH_CHECK(grad.device() == pred.device(), "sit_ext.", op, ": expected grad on ", pred.device(),
              ", got ", grad.device());
  return grad.to(acc).contiguous();
}

// ---- AdaLN-Zero family.
//
// dtypes: x (the residual stream, and x_out) in X; h, gate, shift and scale in
// one dtype L, which is X, or bfloat16/float16 with float32 x (the autocast
// configuration: the residual stream stays float32 while Linear outputs are
// bfloat16); y in X or L. Per-sample gradients come back in L, dx in X, dh in L.

// x (and h, when given) as contiguous [B, T, D] data; [B, D] counts as T = 1.
// `low` is L once h or a modulation vector has been checked.
struct AdalnArgs {
  at::Tensor x, h;
  int64_t batch, tokens, dim;
  std::optional<at::ScalarType> low;
  at::Tensor bias = {};  // h's folded [D] bias in the accumulation dtype, or undefined
  at::ScalarType bias_dtype = at::kFloat;  // the bias as given (its gradient's dtype)
};

inline bool is_autocast_pair(at::ScalarType x, at::ScalarType low) {
  return low == x || (x == at::kFloat && (low == at::kBFloat16 || low == at::kHalf));
}

// Records v's dtype as L, or checks it against the L already seen.
inline void check_low_dtype(const char* op, const char* name, const at::Tensor& v, AdalnArgs& a) {
  const at::ScalarType d = v.scalar_type(), x = a.x.scalar_type();
  if (a.low.has_value()) {
    TORCH_CHECK(d == *a.low, "sit_ext.", op, ": expected ", name, " in the dtype of ",
                a.h.defined() ? "h" : "the other modulation vectors", " (", *a.low, "), got ", d);
    return;
  }
  TORCH_CHECK(is_autocast_pair(x, d), "sit_ext.", op, ": expected ", name, " in x's dtype (", x,
              ") or, with float32 x, in bfloat16 or float16; got ", d);
  a.low = d;
}

inline AdalnArgs adaln_args(const char* op, const char* x_name, const at::Tensor& x,
                            const at::Tensor& h = at::Tensor()) {
  check_float(op, x_name, x);
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, "sit_ext.", op, ": expected ", x_name,
              " of shape [B, T, D] or [B, D], got ", x.sizes());
  TORCH_CHECK(x.size(-1) >= 1, "sit_ext.", op, ": expected D >= 1, got ", x_name, " of shape ",
              x.sizes());
  AdalnArgs a{x.contiguous(), at::Tensor(), x.size(0), x.dim() == 3 ? x.size(1) : 1,
              x.size(-1),     std::nullopt};
  if (h.defined()) {
    check_shape_device(op, x_name, x, "h", h);
    check_low_dtype(op, "h", h, a);
    a.h = h.contiguous();
  }
  return a;
}

// An op that needs h refuses an undefined one (None passed for a Tensor).
inline AdalnArgs adaln_args_with_h(const char* op, const char* x_name, const at::Tensor& x,
                                   const at::Tensor& h) {
  TORCH_CHECK(h.defined(), "sit_ext.", op, ": h is undefined (expected a tensor like ", x_name,
              ")");
  return adaln_args(op, x_name, x, h);
}

// A per-sample modulation vector (shift, scale, gate): [B, D] with inner stride
// 1, used in place whatever its outer stride (chunk(6, dim=1) views work).
inline void check_modulation(const char* op, const char* name, const at::Tensor& v, AdalnArgs& a) {
  check_float(op, name, v);
  TORCH_CHECK(v.dim() == 2 && v.size(0) == a.batch && v.size(1) == a.dim, "sit_ext.", op,
              ": expected ", name, " of shape [", a.batch, ", ", a.dim, "], got ", v.sizes());
  check_low_dtype(op, name, v, a);
  TORCH_CHECK(v.device() == a.x.device(), "sit_ext.", op, ": expected ", name, " on ", a.x.device(),
              ", got ", v.device());
  TORCH_CHECK(v.stride(1) == 1 || a.dim == 1, "sit_ext.", op, ": expected ", name,
              " to have inner stride 1 (a [B, D] view with contiguous rows), got strides ",
              v.strides());
}

// The bias folded into h (gated_residual_ln_modulate): absent, or [D] on x's
// device in x's dtype or h's (under autocast: the float32 parameter as it is,
// with no cast of its own). Kernels read it in the accumulation dtype.
inline void check_bias(const char* op, const std::optional<at::Tensor>& bias, AdalnArgs& a) {
  if (!bias.has_value() || !bias->defined()) return;
  const at::Tensor& b = *bias;
  check_float(op, "bias", b);
  TORCH_CHECK(b.dim() == 1 && b.size(0) == a.dim, "sit_ext.", op, ": expected bias of shape [",
              a.dim, "] (one value per feature of h), got ", b.sizes());
  TORCH_CHECK(b.device() == a.x.device(), "sit_ext.", op, ": expected bias on ", a.x.device(),
              ", got ", b.device());
  const at::ScalarType x = a.x.scalar_type(), low = a.low.value_or(x);
  TORCH_CHECK(b.scalar_type() == x || b.scalar_type() == low, "sit_ext.", op,
              ": expected bias in x's dtype (", x, ") or h's (", low, "), got ", b.scalar_type());
  a.bias = b.to(at::toOpMathType(x)).contiguous();
  a.bias_dtype = b.scalar_type();
}

// The dtype of y (named `name`): X or L.
inline at::ScalarType y_dtype(const char* op, const char* name, std::optional<at::ScalarType> dtype,
                              const AdalnArgs& a) {
  const at::ScalarType x = a.x.scalar_type(), low = a.low.value_or(x);
  const at::ScalarType y = dtype.value_or(x);
  TORCH_CHECK(y == x || y == low, "sit_ext.", op, ": expected ", name, " in x's dtype (", x,
              ") or the modulation's (", low, "), got ", y);
  return y;
}

// The incoming gradient of y: y's shape and device, in X or L, made contiguous.
inline at::Tensor grad_y_arg(const char* op, const at::Tensor& grad_y, const AdalnArgs& a) {
  check_shape_device(op, a.h.defined() ? "x_out" : "x", a.x, "grad_y", grad_y);
  y_dtype(op, "grad_y", grad_y.scalar_type(), a);
  return grad_y.contiguous();
}

// The saved row statistics: shape x.shape[:-1], float32 (float64 for float64).
inline void check_stats(const char* op, const at::Tensor& mean, const at::Tensor& rstd,
                        const at::Tensor& x) {
  const auto acc = at::toOpMathType(x.scalar_type());
  for (const at::Tensor* s : {&mean, &rstd}) {
    const char* name = s == &mean ? "mean" : "rstd";
    TORCH_CHECK(s->sizes() == x.sizes().slice(0, x.dim() - 1) && s->scalar_type() == acc &&
                    s->device() == x.device() && s->is_contiguous(),
                "sit_ext.", op, ": expected ", name, " as saved by the forward (contiguous ", acc,
                " of shape ", x.sizes().slice(0, x.dim() - 1), " on ", x.device(), "), got ",
                s->scalar_type(), " ", s->sizes());
  }
}

// ---- Outputs.

// A tensor like `like`, or an empty one when the output is not asked for.
inline at::Tensor empty_if(bool needed, const at::Tensor& like) {
  return needed ? at::empty_like(like) : at::empty({0}, like.options());
}

// A tensor in x's accumulation dtype: float32, or float64 for float64 x.
inline at::Tensor acc_empty(at::IntArrayRef sizes, const at::Tensor& x) {
  return at::empty(sizes, x.options().dtype(at::toOpMathType(x.scalar_type())));
}

// Per-row statistics of x: shape x.shape[:-1], in the accumulation dtype.
inline at::Tensor stats_empty(const at::Tensor& x) {
  return acc_empty(x.sizes().slice(0, x.dim() - 1), x);
}

// A [B, D] per-sample gradient in L, or an empty tensor when not asked for.
inline at::Tensor per_sample_empty(bool needed, const AdalnArgs& a) {
  const auto options = a.x.options().dtype(a.low.value_or(a.x.scalar_type()));
  return needed ? at::empty({a.batch, a.dim}, options) : at::empty({0}, options);
}

// Data pointers for kernels: null for an undefined or empty tensor (an input
// not given, an output not asked for), so kernels skip it.
template <typename T>
const T* in_ptr(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.const_data_ptr<T>() : nullptr;
}
template <typename T>
T* out_ptr(at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.mutable_data_ptr<T>() : nullptr;
}

// ---- AdaLN op front ends: the checked arguments and the allocated outputs,
// shared by the CPU and CUDA implementations.

struct AdalnForward {
  AdalnArgs a;
  at::Tensor x_out, y, mean, rstd;  // x_out is undefined without the residual
};

// ln_modulate (residual = false) or gated_residual_ln_modulate.
inline AdalnForward adaln_forward_args(const char* op, bool residual, const at::Tensor& x,
                                       const at::Tensor& h, const at::Tensor& gate,
                                       const at::Tensor& shift, const at::Tensor& scale,
                                       std::optional<at::ScalarType> out_dtype,
                                       const std::optional<at::Tensor>& bias = std::nullopt) {
  AdalnForward f{residual ? adaln_args_with_h(op, "x", x, h) : adaln_args(op, "x", x)};
  if (residual) check_modulation(op, "gate", gate, f.a);
  check_bias(op, bias, f.a);
  check_modulation(op, "shift", shift, f.a);
  check_modulation(op, "scale", scale, f.a);
  if (residual) f.x_out = at::empty_like(f.a.x);
  f.y = at::empty_like(f.a.x, f.a.x.options().dtype(y_dtype(op, "out_dtype", out_dtype, f.a)));
  f.mean = stats_empty(f.a.x);
  f.rstd = stats_empty(f.a.x);
  return f;
}

struct AdalnBackward {
  AdalnArgs a;
  at::Tensor dy, dxo;                        // contiguous; dxo undefined when not given
  at::Tensor dx, dh, dgate, dshift, dscale;  // empty when not asked for
  at::Tensor dbias;                          // in the accumulation dtype; see bias_grad
};

inline AdalnBackward ln_modulate_backward_args(const char* op, const at::Tensor& grad_y,
                                               const at::Tensor& x, const at::Tensor& scale,
                                               const at::Tensor& mean, const at::Tensor& rstd,
                                               std::array<bool, 3> mask) {
  AdalnBackward g{adaln_args(op, "x", x)};
  check_modulation(op, "scale", scale, g.a);
  g.dy = grad_y_arg(op, grad_y, g.a);
  check_stats(op, mean, rstd, x);
  g.dx = empty_if(mask[0], g.a.x);
  g.dshift = per_sample_empty(mask[1], g.a);
  g.dscale = per_sample_empty(mask[2], g.a);
  g.dgate = per_sample_empty(false, g.a);
  g.dbias = acc_empty({0}, g.a.x);
  return g;
}

inline AdalnBackward gated_residual_ln_modulate_backward_args(
    const char* op, const std::optional<at::Tensor>& grad_x_out, const at::Tensor& grad_y,
    const at::Tensor& x_out, const at::Tensor& h, const at::Tensor& gate, const at::Tensor& scale,
    const at::Tensor& mean, const at::Tensor& rstd, std::array<bool, 6> mask,
    const std::optional<at::Tensor>& bias) {
  AdalnBackward g{adaln_args_with_h(op, "x_out", x_out, h)};
  check_modulation(op, "gate", gate, g.a);
  check_bias(op, bias, g.a);
  TORCH_CHECK(!mask[5] || g.a.bias.defined(), "sit_ext.", op,
              ": output_mask[5] asks for the gradient of bias, but no bias was given");
  check_modulation(op, "scale", scale, g.a);
  g.dy = grad_y_arg(op, grad_y, g.a);
  if (grad_x_out.has_value()) {
    check_like(op, "x_out", x_out, "grad_x_out", *grad_x_out);
    g.dxo = grad_x_out->contiguous();
  }
  check_stats(op, mean, rstd, x_out);
  g.dx = empty_if(mask[0], g.a.x);
  g.dh = empty_if(mask[1], g.a.h);
  g.dgate = per_sample_empty(mask[2], g.a);
  g.dshift = per_sample_empty(mask[3], g.a);
  g.dscale = per_sample_empty(mask[4], g.a);
  g.dbias = acc_empty({mask[5] ? g.a.dim : 0}, g.a.x);
  return g;
}

// The folded bias's gradient in the bias's own dtype (empty, in L, when not asked for).
inline at::Tensor bias_grad(const AdalnBackward& g) {
  return g.dbias.numel() > 0 ? as_dtype(g.dbias, g.a.bias_dtype) : per_sample_empty(false, g.a);
}

}  // namespace sit_ext
