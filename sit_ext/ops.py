"""Thin Python wrappers of the sit_ext custom ops, with their fake (meta)
kernels. Autograd lives in C++ (csrc/autograd/): a call goes from Python to
the dispatcher to the kernel with no Python frame in between, and every
backward is itself a custom op (which refuses a double backward).

Time convention: t = 0 is data, t = 1 is noise; x_t = alpha(t) x + beta(t) noise
and u_t = alpha'(t) x + beta'(t) noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from . import _C  # loads the kernels and registers the schemas

_ops = torch.ops.sit_ext
_is_compiling = torch.compiler.is_compiling
_function_mode = torch._C._is_torch_function_mode_enabled


def _direct(*tensors: Tensor) -> bool:
    """Whether a call may skip torch.ops for _C.call (the same dispatcher
    call, without the cost of matching Python arguments to the schema): only
    eagerly, on plain tensors, with no __torch_function__ mode or override
    that torch.ops would honour."""
    return not _is_compiling() and not _function_mode() and all(type(t) is Tensor for t in tensors)


class _Handles:
    """Dispatcher handles of the forward ops, for _C.call."""

    def __init__(self, *names: str):
        for name in names:
            setattr(self, name, _C.handle(f"sit_ext::{name}"))


_h = _Handles("interpolant", "velocity_mse", "mse", "ln_modulate", "gated_residual_ln_modulate", "gated_residual",
              "gelu_mlp")

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
    if _direct(x, noise, tt):
        return _C.call(_h.interpolant, x, noise, tt, sid, outputs)
    return _ops.interpolant.default(x, noise, tt, sid, outputs)


@torch.library.register_fake("sit_ext::interpolant")
def _(x, noise, t, schedule, output_mask):
    _check_devices("interpolant", x=x, noise=noise, t=t)
    return tuple(x.new_empty(x.shape if need else (0,)) for need in output_mask)


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
    if _direct(pred, x, noise, tt):
        per_sample = _C.call(_h.velocity_mse, pred, x, noise, tt, sid)
    else:
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
    if _direct(pred, target):
        return _C.call(_h.mse, pred, target)
    return _ops.mse.default(pred, target)


@torch.library.register_fake("sit_ext::mse")
def _(pred, target):
    _check_devices("mse", pred=pred, target=target)
    return pred.new_empty((), dtype=_acc_dtype(pred.dtype, target.dtype))


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
    args = (x, shift, scale, _eps(eps), _out_dtype(out_dtype))
    if _direct(x, shift, scale):
        return _C.call(_h.ln_modulate, *args)[0]
    return _ops.ln_modulate.default(*args)[0]


def gated_residual_ln_modulate(x: Tensor, h: Tensor, gate: Tensor, shift: Tensor, scale: Tensor,
                               eps: float = 1e-6, out_dtype: torch.dtype | None = None,
                               bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(x_out, y) with x_out = x + gate (h + bias) and y = LayerNorm(x_out) (1 + scale) + shift:
    the end of one sub-block and the start of the next, in one pass. bias ([D] in
    x's dtype or h's, optional) is the bias of the Linear that made h, folded in
    (under autocast, the float32 parameter as it is): its gradient comes from the
    per-sample sums the backward makes anyway, not from a pass of its own over
    h's gradient."""
    folded = {} if bias is None else {"bias": bias}
    _tensors("gated_residual_ln_modulate", x=x, h=h, gate=gate, shift=shift, scale=scale, **folded)
    args = (x, h, gate, shift, scale, _eps(eps), _out_dtype(out_dtype), bias)
    if _direct(x, h, gate, shift, scale, *folded.values()):
        x_out, y, _, _ = _C.call(_h.gated_residual_ln_modulate, *args)
    else:
        x_out, y, _, _ = _ops.gated_residual_ln_modulate.default(*args)
    return x_out, y


def gated_residual(x: Tensor, h: Tensor, gate: Tensor) -> Tensor:
    """x + gate h."""
    _tensors("gated_residual", x=x, h=h, gate=gate)
    if _direct(x, h, gate):
        return _C.call(_h.gated_residual, x, h, gate)
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


@torch.library.register_fake("sit_ext::ln_modulate_backward")
def _(grad_y, x, scale, mean, rstd, output_mask):
    _check_devices("ln_modulate_backward", x=x, grad_y=grad_y, scale=scale, mean=mean, rstd=rstd)
    return (x.new_empty(x.shape if output_mask[0] else (0,)),
            _per_sample_like(x, scale, output_mask[1]), _per_sample_like(x, scale, output_mask[2]))


@torch.library.register_fake("sit_ext::gated_residual_ln_modulate")
def _(x, h, gate, shift, scale, eps, out_dtype=None, bias=None):
    _check_devices("gated_residual_ln_modulate", x=x, h=h, gate=gate, shift=shift, scale=scale, bias=bias)
    return x.new_empty(x.shape), x.new_empty(x.shape, dtype=out_dtype or x.dtype), _stats_like(x), _stats_like(x)


@torch.library.register_fake("sit_ext::gated_residual_ln_modulate_backward")
def _(grad_x_out, grad_y, x_out, h, gate, scale, mean, rstd, output_mask, bias=None):
    _check_devices("gated_residual_ln_modulate_backward", x_out=x_out, grad_y=grad_y, h=h, gate=gate,
                   scale=scale, mean=mean, rstd=rstd, grad_x_out=grad_x_out, bias=bias)
    if output_mask[5] and bias is None:
        raise RuntimeError("sit_ext.gated_residual_ln_modulate_backward: output_mask[5] asks for the gradient "
                           "of bias, but no bias was given")
    return (x_out.new_empty(x_out.shape if output_mask[0] else (0,)),
            h.new_empty(x_out.shape if output_mask[1] else (0,)),
            *(_per_sample_like(x_out, scale, m) for m in output_mask[2:5]),
            (bias if output_mask[5] else scale).new_empty((x_out.shape[-1],) if output_mask[5] else (0,)))


@torch.library.register_fake("sit_ext::gated_residual")
def _(x, h, gate):
    _check_devices("gated_residual", x=x, h=h, gate=gate)
    return x.new_empty(x.shape)


@torch.library.register_fake("sit_ext::gated_residual_backward")
def _(grad, h, gate, output_mask):
    _check_devices("gated_residual_backward", grad=grad, h=h, gate=gate)
    return h.new_empty(grad.shape if output_mask[0] else (0,)), _per_sample_like(grad, gate, output_mask[1])


# ------------------------------------------------------------------------ MLP


def gelu_mlp(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor | None = None) -> Tensor:
    """fc2(GELU_tanh(fc1(x))) as one op: GELU_tanh(x w1^T + b1) w2^T (+ b2).

    x [..., K], w1 [H, K], b1 [H], w2 [N, H], b2 [N] (optional: the model folds
    fc2's bias into the gated residual instead); returns [..., N]. One dtype
    for all, or any under autocast, which casts them as for nn.Linear (the
    weights through its cache). On CUDA in float16/bfloat16 with K, H and N
    multiples of 8, fc1's bias and GELU run in the epilogue of fc1's cuBLASLt
    GEMM and backward's GELU derivative and b1 gradient in that of the GEMM
    making fc2's input gradient; elsewhere ATen's GEMMs and GELU, from C++.
    """
    folded = {} if b2 is None else {"b2": b2}
    _tensors("gelu_mlp", x=x, w1=w1, b1=b1, w2=w2, **folded)
    if _direct(x, w1, b1, w2, *folded.values()):
        return _C.call(_h.gelu_mlp, x, w1, b1, w2, b2)[0]
    return _ops.gelu_mlp.default(x, w1, b1, w2, b2)[0]


@torch.library.register_fake("sit_ext::gelu_mlp")
def _(x, w1, b1, w2, b2=None):
    _check_devices("gelu_mlp", x=x, w1=w1, b1=b1, w2=w2, b2=b2)
    hidden = x.new_empty((math.prod(x.shape[:-1]), w1.shape[0]))
    return x.new_empty((*x.shape[:-1], w2.shape[0])), hidden, x.new_empty(hidden.shape)


@torch.library.register_fake("sit_ext::gelu_mlp_backward")
def _(grad, x, w1, w2, act, pre, output_mask):
    _check_devices("gelu_mlp_backward", x=x, grad=grad, w1=w1, w2=w2, act=act, pre=pre)
    shapes = (x.shape, w1.shape, w1.shape[:1], w2.shape, w2.shape[:1])
    return tuple(x.new_empty(shape if need else (0,)) for shape, need in zip(shapes, output_mask))
