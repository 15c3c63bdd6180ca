"""Thin Python wrappers of the sit_ext custom ops, with their fake (meta)
kernels and autograd formulas. Every backward is itself a custom op.

Time convention: t = 0 is data, t = 1 is noise; x_t = alpha(t) x + beta(t) noise
and u_t = alpha'(t) x + beta'(t) noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import _C  # noqa: F401  (loads the kernels and registers the schemas)

_ops = torch.ops.sit_ext

# Built-in schedules, computed inside the kernels from t.
SCHEDULES = {"linear": 0, "cosine": 1, "vp": 2}
_COEFFICIENTS = 3  # t is a [B, 4] table of (alpha, beta, alpha', beta')

Coefficients = Sequence[Tensor]


def schedule_id(schedule: str) -> int:
    if not isinstance(schedule, str) or schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: expected one of {sorted(SCHEDULES)}")
    return SCHEDULES[schedule]


def _tensors(op: str, **args) -> None:
    """TypeError naming the argument when a required tensor is something else
    (None, a list, a float)."""
    for name, value in args.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"sit_ext.{op}: {name} must be a Tensor, got {type(value).__name__}")


def _outputs(outputs) -> list[bool]:
    if (not isinstance(outputs, (tuple, list)) or len(outputs) != 2
            or not all(isinstance(o, bool) for o in outputs)):
        raise ValueError(f"outputs must be a pair of bools (x_t, u_t), got {outputs!r}")
    return list(outputs)


def _eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    return float(eps)


def _out_dtype(out_dtype) -> torch.dtype | None:
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise TypeError(f"out_dtype must be None or a floating torch.dtype, got {out_dtype!r}")
    return out_dtype


def _time_input(x: Tensor, t: Tensor | None, schedule: str, coefficients: Coefficients | None,
                used: tuple[bool, bool, bool, bool] = (True, True, True, True)) -> tuple[Tensor, int]:
    """(t, schedule id) for the kernels: t [B] with a built-in schedule, or the
    [B, 4] table stacked from the per-sample coefficient vectors. `used` says
    which of (alpha, beta, alpha', beta') the outputs depend on; the others are
    detached, so that no zero gradient meets an infinite derivative (beta =
    sqrt(t) at t = 0, say) on its way back and turns into NaN."""
    if coefficients is None:
        if not isinstance(t, Tensor):
            raise TypeError(f"t must be a tensor of shape [B] (or pass coefficients=...), got {type(t).__name__}")
        return t, schedule_id(schedule)
    if t is not None:
        raise ValueError("pass either t (with a built-in schedule) or coefficients, not both")
    if isinstance(coefficients, Tensor) or not isinstance(coefficients, Sequence) or len(coefficients) != 4:
        # A [B, 4] (or [4, B]) tensor would be unpacked row by row: ask for the columns explicitly.
        got = (f"a tensor of shape {tuple(coefficients.shape)}" if isinstance(coefficients, Tensor)
               else repr(coefficients))
        raise TypeError("coefficients must be a sequence of 4 tensors (alpha, beta, d_alpha, d_beta), each [B], "
                        f"got {got}; for a [B, 4] table pass table.unbind(1)")
    batch = x.shape[0] if x.dim() > 0 else None
    for name, c in zip(("alpha", "beta", "d_alpha", "d_beta"), coefficients):
        if not isinstance(c, Tensor) or c.dim() != 1 or c.shape[0] != batch:
            shape = tuple(c.shape) if isinstance(c, Tensor) else type(c).__name__
            raise ValueError(f"coefficient {name} must have shape [{batch}], got {shape}")
    # In float32 (float64 if any is): exact for half-precision vectors, and a stack
    # that autocast takes (it refuses float16 beside bfloat16 autocast, and mixes).
    acc = torch.float64 if any(c.dtype == torch.float64 for c in coefficients) else torch.float32
    table = [(c if u else c.detach()).to(acc) for c, u in zip(coefficients, used)]
    return torch.stack(table, dim=1), _COEFFICIENTS


def _check_weight(weight: Tensor | None, per_sample: Tensor) -> None:
    if weight is not None and not isinstance(weight, Tensor):
        raise TypeError(f"weight must be None or a tensor of shape [{per_sample.shape[0]}], "
                        f"got {type(weight).__name__}")
    if weight is not None and (weight.dim() != 1 or weight.shape[0] != per_sample.shape[0]):
        raise ValueError(f"weight must have shape [{per_sample.shape[0]}], got {tuple(weight.shape)}")


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def _check_devices(op: str, **tensors: Tensor | None) -> None:
    """Fake kernels check devices too, so a mix is caught at trace time (and for
    meta tensors, which never reach the C++ checks)."""
    named = [(name, t.device) for name, t in tensors.items() if t is not None]
    for name, device in named[1:]:
        if device != named[0][1]:
            raise RuntimeError(f"sit_ext.{op}: expected {name} on {named[0][1]} like {named[0][0]}, "
                               f"got {device}")


def _grads(mask: Sequence[bool], grads: Sequence[Tensor]) -> list[Tensor | None]:
    return [g if need else None for need, g in zip(mask, grads)]


# ---------------------------------------------------------------- interpolant


def interpolant(x: Tensor, noise: Tensor, t: Tensor | None = None, schedule: str = "linear", *,
                coefficients: Coefficients | None = None,
                outputs: tuple[bool, bool] = (True, True)) -> tuple[Tensor, Tensor]:
    """(x_t, u_t) in one pass over x and noise.

    x, noise: [B, ...], same shape and dtype. Either t [B] with a built-in
    `schedule` ("linear", "cosine", "vp"), or `coefficients` = (alpha, beta,
    d_alpha, d_beta), each [B], for any other schedule (these receive gradients).
    `outputs` picks which of x_t, u_t to compute; the other comes back empty.
    """
    _tensors("interpolant", x=x, noise=noise)
    outputs = _outputs(outputs)
    tt, sid = _time_input(x, t, schedule, coefficients, (outputs[0], outputs[0], outputs[1], outputs[1]))
    return _ops.interpolant.default(x, noise, tt, sid, outputs)


@torch.library.register_fake("sit_ext::interpolant")
def _(x, noise, t, schedule, output_mask):
    _check_devices("interpolant", x=x, noise=noise, t=t)
    return tuple(x.new_empty(x.shape if need else (0,)) for need in output_mask)


def _interpolant_setup(ctx, inputs, output):
    x, noise, t, schedule, outputs = inputs
    ctx.save_for_backward(x, noise, t)
    ctx.schedule, ctx.outputs = schedule, outputs
    ctx.set_materialize_grads(False)


def _interpolant_backward(ctx, grad_xt, grad_ut):
    x, noise, t = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:3])
    # An output that was not computed (an empty tensor) passes no gradient.
    grad_xt, grad_ut = (g if computed else None for g, computed in zip((grad_xt, grad_ut), ctx.outputs))
    if grad_xt is None and grad_ut is None:
        return None, None, None, None, None
    grads = _ops.interpolant_backward.default(grad_xt, grad_ut, x, noise, t, ctx.schedule, mask)
    return *_grads(mask, grads), None, None


torch.library.register_autograd("sit_ext::interpolant", _interpolant_backward,
                                setup_context=_interpolant_setup)


@torch.library.register_fake("sit_ext::interpolant_backward")
def _(grad_xt, grad_ut, x, noise, t, schedule, output_mask):
    _check_devices("interpolant_backward", x=x, noise=noise, t=t, grad_xt=grad_xt, grad_ut=grad_ut)
    return (x.new_empty(x.shape if output_mask[0] else (0,)),
            x.new_empty(x.shape if output_mask[1] else (0,)),
            t.new_empty(t.shape if output_mask[2] else (0,)))


# --------------------------------------------------------------- velocity MSE


def velocity_mse(pred: Tensor, x: Tensor, noise: Tensor, t: Tensor | None = None,
                 schedule: str = "linear", *, coefficients: Coefficients | None = None,
                 weight: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """MSE between pred and the target velocity u_t, fused: u_t is computed in
    the kernel and never written to memory.

    pred may have any float dtype (a model under autocast predicts in bfloat16
    while x and noise stay float32): it is read as it is, with no cast pass. The
    per-sample loss is the mean over the non-batch dims of (pred - u_t)^2, times
    `weight` [B] if given; `reduction` "mean" averages it over the batch, "none"
    returns it. The result is float32 (float64 when pred or x is float64).
    Gradients come back in each input's dtype.
    """
    _tensors("velocity_mse", pred=pred, x=x, noise=noise)
    tt, sid = _time_input(x, t, schedule, coefficients, (False, False, True, True))
    per_sample = _ops.velocity_mse.default(pred, x, noise, tt, sid)
    _check_weight(weight, per_sample)
    if weight is not None:
        per_sample = per_sample * weight
    return _reduce(per_sample, reduction)


def _acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


@torch.library.register_fake("sit_ext::velocity_mse")
def _(pred, x, noise, t, schedule):
    _check_devices("velocity_mse", x=x, pred=pred, noise=noise, t=t)
    return x.new_empty(x.shape[:1], dtype=_acc_dtype(x.dtype, pred.dtype))


def _velocity_mse_setup(ctx, inputs, output):
    pred, x, noise, t, schedule = inputs
    ctx.save_for_backward(pred, x, noise, t)
    ctx.schedule = schedule


def _velocity_mse_backward(ctx, grad):
    pred, x, noise, t = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:4])
    grads = _ops.velocity_mse_backward.default(grad, pred, x, noise, t, ctx.schedule, mask)
    return *_grads(mask, grads), None


torch.library.register_autograd("sit_ext::velocity_mse", _velocity_mse_backward,
                                setup_context=_velocity_mse_setup)


@torch.library.register_fake("sit_ext::velocity_mse_backward")
def _(grad, pred, x, noise, t, schedule, output_mask):
    _check_devices("velocity_mse_backward", x=x, pred=pred, noise=noise, t=t, grad=grad)
    tensors = [like.new_empty(x.shape if need else (0,)) for like, need in zip((pred, x, x), output_mask[:3])]
    return *tensors, t.new_empty(t.shape if output_mask[3] else (0,))


# ------------------------------------------------------------------------ MSE


def mse(pred: Tensor, target: Tensor) -> Tensor:
    """Mean of (pred - target)^2 over all elements, fused forward and backward.
    pred and target may differ in dtype (each is read as it is). Returns a 0-d
    float32 tensor (float64 when either is float64)."""
    _tensors("mse", pred=pred, target=target)
    return _ops.mse.default(pred, target)


@torch.library.register_fake("sit_ext::mse")
def _(pred, target):
    _check_devices("mse", pred=pred, target=target)
    return pred.new_empty((), dtype=_acc_dtype(pred.dtype, target.dtype))


def _mse_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _mse_backward(ctx, grad):
    pred, target = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:2])
    return tuple(_grads(mask, _ops.mse_backward.default(grad, pred, target, mask)))


torch.library.register_autograd("sit_ext::mse", _mse_backward, setup_context=_mse_setup)


@torch.library.register_fake("sit_ext::mse_backward")
def _(grad, pred, target, output_mask):
    _check_devices("mse_backward", pred=pred, target=target, grad=grad)
    return tuple(like.new_empty(pred.shape if need else (0,)) for like, need in zip((pred, target), output_mask))


# ------------------------------------------------------------- AdaLN-Zero
#
# x, h: [B, T, D] or [B, D]; shift, scale, gate: [B, D] with inner stride 1,
# used in place (the strided views that chunk(6, dim=1) makes are fine).
#
# dtypes: h, gate, shift and scale share one, which is x's, or bfloat16/float16
# with float32 x: under autocast the residual stream x stays float32 while the
# Linear outputs (attention, MLP, modulation) are bfloat16, and the ops read
# each as it is. x_out keeps x's dtype; y is written in `out_dtype` (x's by
# default, or theirs: what the next Linear reads under autocast). Gradients come
# back in each input's dtype.


def ln_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6,
                out_dtype: torch.dtype | None = None) -> Tensor:
    """y = LayerNorm(x) (1 + scale) + shift, LayerNorm without affine."""
    _tensors("ln_modulate", x=x, shift=shift, scale=scale)
    return _ops.ln_modulate.default(x, shift, scale, _eps(eps), _out_dtype(out_dtype))[0]


def gated_residual_ln_modulate(x: Tensor, h: Tensor, gate: Tensor, shift: Tensor, scale: Tensor,
                               eps: float = 1e-6, out_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """(x_out, y) with x_out = x + gate h and y = LayerNorm(x_out) (1 + scale) + shift:
    the end of one sub-block and the start of the next, in one pass."""
    _tensors("gated_residual_ln_modulate", x=x, h=h, gate=gate, shift=shift, scale=scale)
    x_out, y, _, _ = _ops.gated_residual_ln_modulate.default(x, h, gate, shift, scale, _eps(eps),
                                                             _out_dtype(out_dtype))
    return x_out, y


def gated_residual(x: Tensor, h: Tensor, gate: Tensor) -> Tensor:
    """x + gate h."""
    _tensors("gated_residual", x=x, h=h, gate=gate)
    return _ops.gated_residual.default(x, h, gate)


def _stats_like(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[:-1], dtype=_acc_dtype(x.dtype))


def _per_sample_like(x: Tensor, like: Tensor, needed: bool) -> Tensor:
    """A [B, D] gradient in the dtype of `like` (a modulation vector)."""
    return like.new_empty((x.shape[0], x.shape[-1]) if needed else (0,))


@torch.library.register_fake("sit_ext::ln_modulate")
def _(x, shift, scale, eps, out_dtype=None):
    _check_devices("ln_modulate", x=x, shift=shift, scale=scale)
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype), _stats_like(x), _stats_like(x)


def _ln_modulate_setup(ctx, inputs, output):
    x, shift, scale, _, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, scale, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _ln_modulate_backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, scale, mean, rstd = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:3])
    grads = _ops.ln_modulate_backward.default(grad_y, x, scale, mean, rstd, mask)
    return *_grads(mask, grads), None, None


torch.library.register_autograd("sit_ext::ln_modulate", _ln_modulate_backward,
                                setup_context=_ln_modulate_setup)


@torch.library.register_fake("sit_ext::ln_modulate_backward")
def _(grad_y, x, scale, mean, rstd, output_mask):
    _check_devices("ln_modulate_backward", x=x, grad_y=grad_y, scale=scale, mean=mean, rstd=rstd)
    return (x.new_empty(x.shape if output_mask[0] else (0,)),
            _per_sample_like(x, scale, output_mask[1]), _per_sample_like(x, scale, output_mask[2]))


@torch.library.register_fake("sit_ext::gated_residual_ln_modulate")
def _(x, h, gate, shift, scale, eps, out_dtype=None):
    _check_devices("gated_residual_ln_modulate", x=x, h=h, gate=gate, shift=shift, scale=scale)
    return x.new_empty(x.shape), x.new_empty(x.shape, dtype=out_dtype or x.dtype), _stats_like(x), _stats_like(x)


def _grlm_setup(ctx, inputs, output):
    _, h, gate, _, scale, _, _ = inputs
    x_out, _, mean, rstd = output
    ctx.save_for_backward(x_out, h, gate, scale, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)


def _grlm_backward(ctx, grad_x_out, grad_y, _grad_mean, _grad_rstd):
    x_out, h, gate, scale, mean, rstd = ctx.saved_tensors
    need_x, need_h, need_gate, need_shift, need_scale = ctx.needs_input_grad[:5]
    if grad_y is None:
        # Only the residual stream was used: the LayerNorm branch passes nothing.
        if grad_x_out is None:
            return (None,) * 7
        dh, dgate = _ops.gated_residual_backward.default(grad_x_out, h, gate, [need_h, need_gate])
        return (grad_x_out if need_x else None, dh if need_h else None, dgate if need_gate else None,
                None, None, None, None)
    mask = [need_x, need_h, need_gate, need_shift, need_scale]
    grads = _ops.gated_residual_ln_modulate_backward.default(
        grad_x_out, grad_y, x_out, h, gate, scale, mean, rstd, mask)
    return *_grads(mask, grads), None, None


torch.library.register_autograd("sit_ext::gated_residual_ln_modulate", _grlm_backward,
                                setup_context=_grlm_setup)


@torch.library.register_fake("sit_ext::gated_residual_ln_modulate_backward")
def _(grad_x_out, grad_y, x_out, h, gate, scale, mean, rstd, output_mask):
    _check_devices("gated_residual_ln_modulate_backward", x_out=x_out, grad_y=grad_y, h=h, gate=gate,
                   scale=scale, mean=mean, rstd=rstd, grad_x_out=grad_x_out)
    return (x_out.new_empty(x_out.shape if output_mask[0] else (0,)),
            h.new_empty(x_out.shape if output_mask[1] else (0,)),
            *(_per_sample_like(x_out, scale, m) for m in output_mask[2:]))


@torch.library.register_fake("sit_ext::gated_residual")
def _(x, h, gate):
    _check_devices("gated_residual", x=x, h=h, gate=gate)
    return x.new_empty(x.shape)


def _gated_residual_setup(ctx, inputs, output):
    _, h, gate = inputs
    ctx.save_for_backward(h, gate)


def _gated_residual_backward(ctx, grad):
    h, gate = ctx.saved_tensors
    need_x, need_h, need_gate = ctx.needs_input_grad[:3]
    dh, dgate = _ops.gated_residual_backward.default(grad, h, gate, [need_h, need_gate])
    return grad if need_x else None, dh if need_h else None, dgate if need_gate else None


torch.library.register_autograd("sit_ext::gated_residual", _gated_residual_backward,
                                setup_context=_gated_residual_setup)


@torch.library.register_fake("sit_ext::gated_residual_backward")
def _(grad, h, gate, output_mask):
    _check_devices("gated_residual_backward", grad=grad, h=h, gate=gate)
    return h.new_empty(grad.shape if output_mask[0] else (0,)), _per_sample_like(grad, gate, output_mask[1])


# ------------------------------------------------------ second-order gradients
#
# The backward ops have no derivative of their own: a double backward through
# one (create_graph=True, then differentiating the gradient: gradient
# penalties, Hessian-vector products) raises instead of silently dropping
# their part of the second derivative.


def _refuse_double_backward(name: str) -> None:
    def backward(ctx, *grads):
        raise RuntimeError(
            f"sit_ext.{name.removesuffix('_backward')}: second-order gradients through the fused op are not "
            "supported (a double backward reached sit_ext::" + name + "); build the model with fused=False, "
            "or use the functions of sit_ext.reference, for gradient penalties and Hessian-vector products")

    torch.library.register_autograd(f"sit_ext::{name}", backward, setup_context=lambda ctx, inputs, output: None)


for _name in ("interpolant_backward", "velocity_mse_backward", "mse_backward", "ln_modulate_backward",
              "gated_residual_ln_modulate_backward", "gated_residual_backward"):
    _refuse_double_backward(_name)
