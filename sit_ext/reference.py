"""Pure-PyTorch references of every sit_ext op. Tests compare the kernels with
them, and `fused=False` paths run them. They compute in the inputs' dtype, as
eager PyTorch does; pass float64 inputs for an exact reference.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

VP_BETA_MIN, VP_BETA_MAX = 0.1, 20.0


def schedule_coefficients(t: Tensor, schedule: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(alpha, beta, alpha', beta') of a built-in schedule at t."""
    if schedule == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    if schedule == "cosine":
        h = math.pi / 2
        c, s = torch.cos(h * t), torch.sin(h * t)
        return c, s, -h * s, h * c
    if schedule == "vp":
        # Held at its ends outside [0, 1]: for -0.01 < t < 0, alpha > 1 and beta = sqrt(1 - alpha^2) is NaN.
        t = t.clamp(0, 1)
        span = VP_BETA_MAX - VP_BETA_MIN
        log_alpha = -0.25 * t * t * span - 0.5 * t * VP_BETA_MIN
        alpha = torch.exp(log_alpha)
        d_alpha = alpha * (-0.5 * t * span - 0.5 * VP_BETA_MIN)
        beta = torch.sqrt(-torch.expm1(2 * log_alpha))  # 1 - alpha^2 without the cancellation near t = 0
        return alpha, beta, d_alpha, -alpha * d_alpha / beta
    raise ValueError(f"unknown schedule {schedule!r}")


def _per_sample(v: Tensor, x: Tensor) -> Tensor:
    return v.to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))


def _coefficients(x, t, schedule, coefficients):
    if coefficients is None:
        coefficients = schedule_coefficients(t, schedule)
    return [_per_sample(c, x) for c in coefficients]


def interpolant(x: Tensor, noise: Tensor, t: Tensor | None = None, schedule: str = "linear", *,
                coefficients=None) -> tuple[Tensor, Tensor]:
    alpha, beta, d_alpha, d_beta = _coefficients(x, t, schedule, coefficients)
    return alpha * x + beta * noise, d_alpha * x + d_beta * noise


def velocity_mse(pred: Tensor, x: Tensor, noise: Tensor, t: Tensor | None = None,
                 schedule: str = "linear", *, coefficients=None, weight: Tensor | None = None,
                 reduction: str = "mean") -> Tensor:
    _, target = interpolant(x, noise, t, schedule, coefficients=coefficients)
    squared = (pred - target) ** 2
    per_sample = squared.mean(dim=tuple(range(1, squared.dim()))) if squared.dim() > 1 else squared
    if weight is not None:
        per_sample = per_sample * weight
    return per_sample.mean() if reduction == "mean" else per_sample


def mse(pred: Tensor, target: Tensor) -> Tensor:
    return ((pred - target) ** 2).mean()


# ------------------------------------------------------------- AdaLN-Zero


def _tokens(v: Tensor, x: Tensor) -> Tensor:
    """A per-sample [B, D] vector broadcast over x's tokens ([B, T, D] or [B, D])."""
    return v.unsqueeze(1) if x.dim() == 3 else v


def ln_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6,
                out_dtype: torch.dtype | None = None) -> Tensor:
    """As the official code, with PyTorch's type promotion for mixed dtypes
    (float32 x with bfloat16 modulation gives float32); `out_dtype` casts the
    result, as autocast does before the next Linear."""
    normed = torch.nn.functional.layer_norm(x, x.shape[-1:], eps=eps)
    y = normed * (1 + _tokens(scale, x)) + _tokens(shift, x)
    return y if out_dtype is None else y.to(out_dtype)


def gated_residual(x: Tensor, h: Tensor, gate: Tensor) -> Tensor:
    return x + _tokens(gate, x) * h


def gated_residual_ln_modulate(x: Tensor, h: Tensor, gate: Tensor, shift: Tensor, scale: Tensor,
                               eps: float = 1e-6, out_dtype: torch.dtype | None = None,
                               bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """As the official code, with the Linear's bias (when given) added to h first."""
    x_out = gated_residual(x, h if bias is None else h + bias, gate)
    return x_out, ln_modulate(x_out, shift, scale, eps, out_dtype)


# ------------------------------------------------------------------------ MLP


def gelu_mlp(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor | None = None) -> Tensor:
    """The official Mlp: fc1, GELU (tanh approximation), fc2."""
    hidden = torch.nn.functional.gelu(torch.nn.functional.linear(x, w1, b1), approximate="tanh")
    return torch.nn.functional.linear(hidden, w2, b2)
