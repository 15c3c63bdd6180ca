"""Interpolation schedules: x_t = alpha(t) x + beta(t) eps, t = 0 data, t = 1 noise.

One abstraction serves the functional API and the transport. Built-in
schedules (linear, cosine/GVP, VP) are computed inside the fused kernels from
t; any other schedule (``Custom``, possibly an ``nn.Module`` with learnable
parameters) passes per-sample coefficient vectors, which receive gradients.

For each schedule, with a' = d alpha / dt and b' = d beta / dt:

- velocity  u = a' x + b' eps, the target of velocity prediction;
- score     s = grad log p_t(x_t) = -E[eps | x_t] / beta;
- noise     eps_hat = E[eps | x_t] = -beta s;
- SDE       the forward SDE dx = f x dt + g dW that has these marginals, with
            f = a'/a and w = g^2 / 2 = beta b' - (a'/a) beta^2 ("diffusion" in
            the official SiT code).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from . import ops
from . import reference as ref


def per_sample(v: Tensor, x: Tensor) -> Tensor:
    """A [B] vector shaped to broadcast against x [B, ...]."""
    return v.reshape((-1,) + (1,) * (x.dim() - 1)).to(x.dtype)


class Schedule(nn.Module):
    """Base class. Subclasses give ``coefficients(t)``; ``kernel`` names the
    built-in schedule the fused kernels compute from t (None: pass coefficients)."""

    kernel: str | None = None

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(alpha, beta, alpha', beta') at t [B], each [B]."""
        raise NotImplementedError

    # ----------------------------------------------------- fused ops

    def interpolant(self, x: Tensor, noise: Tensor, t: Tensor,
                    outputs: tuple[bool, bool] = (True, True)) -> tuple[Tensor, Tensor]:
        """(x_t, u_t) through the fused kernel."""
        if self.kernel is not None:
            return ops.interpolant(x, noise, t, self.kernel, outputs=outputs)
        return ops.interpolant(x, noise, coefficients=self.coefficients(t), outputs=outputs)

    def velocity_mse(self, pred: Tensor, x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Per-sample mean of (pred - u_t)^2, u_t computed inside the kernel."""
        if self.kernel is not None:
            return ops.velocity_mse(pred, x, noise, t, self.kernel, reduction="none")
        return ops.velocity_mse(pred, x, noise, coefficients=self.coefficients(t), reduction="none")

    # ------------------------------------------------------- the SDE

    def sde(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(f, w) per sample: the forward SDE's drift is f x, its g^2 / 2 is w."""
        a, b, da, db = self.coefficients(t)
        f = da / a
        return f, b * db - f * b * b

    # ------------------------------------------------ conversions

    def _coef(self, x: Tensor, t: Tensor) -> list[Tensor]:
        return [per_sample(c, x) for c in self.coefficients(t)]

    def score_from_noise(self, noise_hat: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        _, b, _, _ = self._coef(x_t, t)
        return -noise_hat / b

    def noise_from_score(self, score: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        _, b, _, _ = self._coef(x_t, t)
        return -b * score

    def velocity_from_noise(self, noise_hat: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        a, b, da, db = self._coef(x_t, t)
        return (da * x_t + (a * db - da * b) * noise_hat) / a

    def noise_from_velocity(self, velocity: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        a, b, da, db = self._coef(x_t, t)
        return (a * velocity - da * x_t) / (a * db - da * b)

    def velocity_from_score(self, score: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return self.velocity_from_noise(self.noise_from_score(score, x_t, t), x_t, t)

    def score_from_velocity(self, velocity: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        return self.score_from_noise(self.noise_from_velocity(velocity, x_t, t), x_t, t)

    def expected_data(self, score: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Tweedie: E[x | x_t] = (x_t + beta^2 s) / alpha."""
        a, b, _, _ = self._coef(x_t, t)
        return (x_t + b * b * score) / a


class _BuiltIn(Schedule):
    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return ref.schedule_coefficients(t, self.kernel)

    def extra_repr(self) -> str:
        return ""


class Linear(_BuiltIn):
    """alpha = 1 - t, beta = t (rectified flow; SiT's default)."""

    kernel = "linear"


class Cosine(_BuiltIn):
    """GVP: alpha = cos(pi t / 2), beta = sin(pi t / 2)."""

    kernel = "cosine"


class VP(_BuiltIn):
    """Variance preserving, beta_min = 0.1, beta_max = 20:
    alpha = exp(-t^2 (beta_max - beta_min) / 4 - t beta_min / 2), beta = sqrt(1 - alpha^2)."""

    kernel = "vp"


def _with_derivative(fn: Callable[[Tensor], Tensor], t: Tensor) -> tuple[Tensor, Tensor]:
    """fn(t) and its derivative by autograd, kept differentiable (for learnable
    schedules and for gradients to t)."""
    with torch.enable_grad():
        tt = t if t.requires_grad else t.detach().requires_grad_(True)
        value = fn(tt)
        (derivative,) = torch.autograd.grad(value.sum(), tt, create_graph=True)
    return value, derivative


class Custom(Schedule):
    """A schedule from callables alpha(t), beta(t) (elementwise on [B]). When
    d_alpha / d_beta are not given, autograd provides them. Subclass it with
    nn.Parameters to learn a schedule: the fused kernels pass gradients to the
    coefficients."""

    def __init__(self, alpha: Callable[[Tensor], Tensor] | None = None,
                 beta: Callable[[Tensor], Tensor] | None = None,
                 d_alpha: Callable[[Tensor], Tensor] | None = None,
                 d_beta: Callable[[Tensor], Tensor] | None = None):
        super().__init__()
        for name, fn in (("alpha", alpha), ("beta", beta), ("d_alpha", d_alpha), ("d_beta", d_beta)):
            if fn is not None and not callable(fn):
                raise TypeError(f"Custom: {name} must be a callable of t, got {type(fn).__name__}")
        self._alpha, self._beta, self._d_alpha, self._d_beta = alpha, beta, d_alpha, d_beta

    def alpha(self, t: Tensor) -> Tensor:
        if self._alpha is None:
            raise NotImplementedError("pass alpha= or override alpha()")
        return self._alpha(t)

    def beta(self, t: Tensor) -> Tensor:
        if self._beta is None:
            raise NotImplementedError("pass beta= or override beta()")
        return self._beta(t)

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if self._d_alpha is not None:
            a, da = self.alpha(t), self._d_alpha(t)
        else:
            a, da = _with_derivative(self.alpha, t)
        if self._d_beta is not None:
            b, db = self.beta(t), self._d_beta(t)
        else:
            b, db = _with_derivative(self.beta, t)
        return a, b, da, db


SCHEDULES = {"linear": Linear, "cosine": Cosine, "gvp": Cosine, "vp": VP}


def get_schedule(schedule: str | Schedule) -> Schedule:
    """A Schedule from a name ("linear", "cosine"/"gvp", "vp") or itself."""
    if isinstance(schedule, Schedule):
        return schedule
    if not isinstance(schedule, str) or schedule.lower() not in SCHEDULES:
        raise ValueError(f"unknown path {schedule!r}: expected one of {sorted(SCHEDULES)} or a Schedule")
    return SCHEDULES[schedule.lower()]()
