"""The seed's functional API for flat vectors and images, backed by the fused ops.

Convention: t = 0 is data, t = 1 is noise. x and noise are [B, ...], of one
dtype; t is [B]. Paths and velocities come back in x's dtype, whatever t's:
unlike eager PyTorch, a float32 t does not promote bfloat16 x.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops
from .schedules import Cosine, Linear

_LINEAR, _COSINE = Linear(), Cosine()


def linear_interpolant(x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x + t noise."""
    return _LINEAR.interpolant(x, noise, t, outputs=(True, False))[0]


def linear_velocity(x: Tensor, noise: Tensor) -> Tensor:
    """d x_t / dt of the linear path: noise - x (independent of t)."""
    t = x.new_zeros(x.shape[:1], dtype=torch.float32)
    return _LINEAR.interpolant(x, noise, t, outputs=(False, True))[1]


def cosine_interpolant(x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = cos(pi t / 2) x + sin(pi t / 2) noise."""
    return _COSINE.interpolant(x, noise, t, outputs=(True, False))[0]


def cosine_velocity(x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """d x_t / dt of the cosine path: (pi / 2) (cos(pi t / 2) noise - sin(pi t / 2) x)."""
    return _COSINE.interpolant(x, noise, t, outputs=(False, True))[1]


def sample_interpolant_time(batch_size: int, *, generator: torch.Generator | None = None,
                            device: torch.device | str | None = None,
                            dtype: torch.dtype | None = None) -> Tensor:
    """t ~ U[0, 1), shape [batch_size]."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 0:
        raise ValueError(f"batch_size must be a non-negative int, got {batch_size!r}")
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    return torch.rand(batch_size, generator=generator, device=device, dtype=dtype)


def sit_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean of (pred - target)^2 over all elements, each read in its own dtype
    (float32 result; float64 when either is float64)."""
    return ops.mse(pred, target)
