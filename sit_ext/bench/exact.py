"""Data with exact answers, for the sampler benchmark: Gaussian mixtures whose
model outputs (velocity, noise, score) and probability-flow map are known
under any path, and the distances that score samples against them."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..schedules import Schedule, per_sample


class GaussianMixture:
    """Data sum_k pi_k N(mu_k, s_k^2 I) and its exact model outputs under any path."""

    def __init__(self, means, stds, weights=None):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)
        k = self.means.shape[0]
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.weights = w / w.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means[k] + self.stds[k, None] * z

    def posterior(self, x_t: Tensor, t: Tensor, schedule: Schedule) -> tuple[Tensor, Tensor, Tensor]:
        """(E[x | x_t], E[eps | x_t], score) at x_t [B, D], t [B]: each component's,
        weighted by its posterior probability."""
        a, b = (per_sample(c, x_t)[:, :, None] for c in schedule.coefficients(t)[:2])  # [B, 1, 1]
        mu, s2 = self.means.to(x_t), self.stds.to(x_t)[None, :, None] ** 2  # [K, D], [1, K, 1]
        var = a * a * s2 + b * b  # [B, K, 1]
        r = x_t[:, None, :] - a * mu  # [B, K, D]
        log_w = self.weights.to(x_t)[:, None].log() - 0.5 * (self.dim * var.log() + (r * r).sum(-1, keepdim=True) / var)
        w = torch.softmax(log_w, dim=1)
        z = r / var
        return (w * (mu + a * s2 * z)).sum(1), (w * b * z).sum(1), -(w * z).sum(1)

    def model(self, schedule: Schedule, prediction: str = "velocity") -> Callable[[Tensor, Tensor], Tensor]:
        """The exact model output (sit_ext time) of a prediction type."""
        def exact(x_t: Tensor, t: Tensor) -> Tensor:
            e_x, e_eps, score = self.posterior(x_t, t, schedule)
            if prediction == "noise":
                return e_eps
            if prediction == "score":
                return score
            _, _, da, db = (per_sample(c, x_t) for c in schedule.coefficients(t))
            return da * e_x + db * e_eps

        return exact

    def flow(self, schedule: Schedule, x: Tensor, t_from: float, t_to: float, rtol: float = 1e-10) -> Tensor:
        """The exact probability-flow map (float64): affine for one component, else
        a float64 dopri5 solve of the exact velocity."""
        x = x.double()
        if self.means.shape[0] == 1:
            def mean_std(t):
                a, b, _, _ = schedule.coefficients(torch.tensor([t], dtype=torch.float64))
                return (a * self.means[0]).to(x), torch.sqrt(a**2 * self.stds[0] ** 2 + b**2).to(x)

            (m0, s0), (m1, s1) = mean_std(t_from), mean_std(t_to)
            return m1 + s1 * (x - m0) / s0
        from torchdiffeq import odeint

        velocity = self.model(schedule)
        times = torch.tensor([t_from, t_to], dtype=torch.float64, device=x.device)
        return odeint(lambda t, y: velocity(y, t.expand(y.shape[0])), x, times, method="dopri5",
                      rtol=rtol, atol=rtol)[-1]


def stiff_gaussian() -> GaussianMixture:
    return GaussianMixture([[1.0]], [0.1])


def narrow_mixture() -> GaussianMixture:
    angles = torch.arange(8, dtype=torch.float64) * math.pi / 4
    return GaussianMixture(2.5 * torch.stack([angles.cos(), angles.sin()], 1), [0.1] * 8)


# ------------------------------------------------------------------ metrics


def rms_distance(a: Tensor, b: Tensor) -> float:
    """sqrt(mean_i |a_i - b_i|^2): the per-sample distance, RMS over samples."""
    return (a.double() - b.double()).norm(dim=1).pow(2).mean().sqrt().item()


def z_scores(x: Tensor, mean: float, std: float) -> tuple[float, float]:
    """Errors of the sample mean and variance of 1-D samples in standard errors
    (std / sqrt(n) and std^2 sqrt(2 / (n - 1)))."""
    x, n = x.double().flatten(), x.numel()
    z_mean = (x.mean().item() - mean) / (std / math.sqrt(n))
    z_var = (x.var().item() / std**2 - 1) / math.sqrt(2 / (n - 1))
    return z_mean, z_var


class SlicedW1:
    """Sliced W1 to a reference of m n points (m an integer) for n samples: per
    direction the exact W1 between the empirical measures, quantile for quantile."""

    def __init__(self, reference: Tensor, n: int, projections: int = 64, seed: int = 0):
        if reference.shape[0] % n:
            raise ValueError(f"the reference ({reference.shape[0]}) must hold a multiple of n = {n} points")
        dirs = torch.randn(reference.shape[1], projections, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(seed))
        self.dirs = dirs / dirs.norm(dim=0, keepdim=True)
        self.repeat = reference.shape[0] // n
        self.reference = torch.sort(reference.double().cpu() @ self.dirs, dim=0).values

    def __call__(self, samples: Tensor) -> float:
        p = torch.sort(samples.double().cpu() @ self.dirs, dim=0).values
        return (p.repeat_interleave(self.repeat, 0) - self.reference).abs().mean().item()
