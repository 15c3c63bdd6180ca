"""Transport: SiT's training losses, ODE and SDE samplers and likelihood.

Time conventions, side by side:

==============  ======================  ======================
                sit_ext (this package)  official SiT code
==============  ======================  ======================
data            t = 0                   t = 1
noise           t = 1                   t = 0
x_t (linear)    (1 - t) x + t eps       t x + (1 - t) eps
velocity        eps - x  (d x_t / dt)   x - eps
sampling        t from 1 down to 0      t from 0 up to 1
==============  ======================  ======================

``Transport(..., model_time="official")`` adapts a model trained with the
official convention (an official checkpoint loaded into ``sit_ext.SiT``): it is
called at 1 - t, and a velocity output is negated. Noise and score outputs
mean the same in both conventions.

Sampling integrates the probability-flow ODE dx/dt = v(x, t) from t = 1 to 0,
or the SDE that adds Langevin dynamics of strength w(t) to it: going toward the
data (tau = -t), dx = [-v + w s] dtau + sqrt(2 w) dW, where s is the score.
Every SDE form keeps the marginals of the path; w = "SBDM" gives the reverse of
the path's forward SDE. The samplers run under ``torch.no_grad()`` with no host
synchronisation inside the step loop (adaptive torchdiffeq solvers aside).

Beyond the official samplers: step schedules for every fixed-step method
(``time_grid``; "power" puts the steps at the stiff data end, where uniform
steps and the official "Mean" last step get the SDE's variance wrong), and a
predictor-corrector ODE solver with one model evaluation per step ("adams").
The solvers themselves live in ``sit_ext.solvers``; samplers tuned to one
model (``sample_ode(..., sampler=)``) are fitted by ``sit_ext.tuned``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from . import ops
from . import reference as ref
from .cuda_graphs import GraphedField, check_device
from .schedules import Schedule, get_schedule, per_sample
from .solvers import (
    Field,
    TunedSampler,
    _choose,
    _finish,
    _odeint,
    _progress,
    adams_sample,
    fixed_step_sample,
    ode_step,
    sde_sample,
    sde_step,
    time_grid,
    tuned_sample,
)

PREDICTIONS = ("velocity", "noise", "score")
LOSS_WEIGHTS = (None, "velocity", "likelihood")
TIME_SAMPLERS = ("uniform", "logit_normal")
MODEL_TIMES = ("sit_ext", "official")
ODE_FIXED = ("euler", "heun")
# torchdiffeq's fixed-step methods: they step on the same grid (num_steps steps) as "euler" and "heun".
TORCHDIFFEQ_FIXED = ("midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams", "fixed_adams")
SDE_METHODS = ("euler", "heun")
DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")
LAST_STEPS = (None, "Mean", "Tweedie", "Euler")



def _count(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def _tensor_arg(name: str, value) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(value).__name__}")


def _interval_arg(name: str, interval) -> tuple[float, float]:
    """(lo, hi) with 0 <= lo <= hi <= 1: a reversed interval would silently select nothing."""
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (lo, hi), got {interval!r}") from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"{name} must satisfy 0 <= lo <= hi <= 1, got {interval!r}")
    return lo, hi



class Transport:
    """Paths, predictions, losses and samplers.

    path: "linear", "cosine" (alias "gvp"), "vp", or a Schedule (``Custom`` for
    user callables). prediction: what the model outputs. loss_weight: for noise
    and score prediction, None, "velocity" or "likelihood" (the official
    weightings); velocity prediction is unweighted. train_eps / sample_eps keep
    t away from the path's singular ends; their defaults follow the official
    code (velocity with linear/cosine: 0; VP: 1e-5 for training, 1e-3 for
    sampling; otherwise 1e-3), each defaulted on its own (the official code
    leaves sample_eps as None when only train_eps is given). time_sampler:
    "uniform" or "logit_normal" (t = sigmoid(N(mean, std)), ``logit_normal``).
    fused=False computes the losses with the pure-PyTorch references.
    """

    def __init__(self, path: str | Schedule = "linear", prediction: str = "velocity",
                 loss_weight: str | None = None, train_eps: float | None = None,
                 sample_eps: float | None = None, time_sampler: str = "uniform",
                 model_time: str = "sit_ext", fused: bool = True,
                 logit_normal: tuple[float, float] = (0.0, 1.0)):
        _choose("prediction", prediction, PREDICTIONS)
        _choose("loss_weight", loss_weight, LOSS_WEIGHTS)
        _choose("time_sampler", time_sampler, TIME_SAMPLERS)
        _choose("model_time", model_time, MODEL_TIMES)
        self.schedule = get_schedule(path)
        self.prediction, self.loss_weight = prediction, loss_weight
        self.time_sampler, self.model_time, self.fused = time_sampler, model_time, fused
        if len(logit_normal) != 2 or not _number("logit_normal std", logit_normal[1]) > 0:
            raise ValueError(f"logit_normal must be (mean, std) with std > 0, got {logit_normal!r}")
        self.logit_normal = (_number("logit_normal mean", logit_normal[0]), float(logit_normal[1]))
        is_vp = self.schedule.kernel == "vp"
        if is_vp:
            default_train, default_sample = 1e-5, 1e-3
        elif prediction != "velocity":
            default_train, default_sample = 1e-3, 1e-3
        else:
            default_train, default_sample = 0.0, 0.0
        self.train_eps = default_train if train_eps is None else _number("train_eps", train_eps)
        self.sample_eps = default_sample if sample_eps is None else _number("sample_eps", sample_eps)
        for name, eps in (("train_eps", self.train_eps), ("sample_eps", self.sample_eps)):
            if not 0.0 <= eps < 0.5:
                raise ValueError(f"{name} must be in [0, 0.5), got {eps}")

    def __repr__(self) -> str:
        return (f"Transport(path={type(self.schedule).__name__}, prediction={self.prediction!r}, "
                f"loss_weight={self.loss_weight!r}, train_eps={self.train_eps}, sample_eps={self.sample_eps}, "
                f"time_sampler={self.time_sampler!r}, model_time={self.model_time!r})")

    # ------------------------------------------------------------ time

    def interval(self, *, sample: bool = False, sde: bool = False, diffusion_form: str = "SBDM",
                 last_step_size: float = 0.0) -> tuple[float, float]:
        """[t_lo, t_hi] for training or sampling, as the official check_interval
        in this time convention."""
        eps = self.sample_eps if sample else self.train_eps
        if sde and diffusion_form == "SBDM" and eps == 0 and self.schedule.kernel in ("linear", "cosine"):
            eps = 1e-3  # SBDM's w is infinite at t = 1 where alpha(1) = 0
        lo, hi = 0.0, 1.0
        if self.schedule.kernel == "vp":
            lo = eps if (not sde or last_step_size == 0) else last_step_size
        elif self.prediction != "velocity" or sde:
            hi = 1.0 - eps if (diffusion_form == "SBDM" and sde) or self.prediction != "velocity" else 1.0
            lo = eps if (not sde or last_step_size == 0) else last_step_size
        return lo, hi

    def sample_time(self, batch: int, device=None, generator: torch.Generator | None = None,
                    dtype: torch.dtype = torch.float32) -> Tensor:
        """t [batch] in the training interval, uniform or logit-normal."""
        lo, hi = self.interval()
        if self.time_sampler == "uniform":
            u = torch.rand(batch, device=device, generator=generator, dtype=dtype)
        else:
            mean, std = self.logit_normal
            u = torch.sigmoid(mean + std * torch.randn(batch, device=device, generator=generator, dtype=dtype))
        return lo + (hi - lo) * u

    # ----------------------------------------------------------- model

    def call_model(self, model: Callable, x_t: Tensor, t: Tensor, model_kwargs: dict | None = None) -> Tensor:
        """The model's output at (x_t, t) in this package's convention."""
        kwargs = model_kwargs or {}
        if self.model_time == "official":
            out = model(x_t, 1 - t, **kwargs)
            return -out if self.prediction == "velocity" else out
        return model(x_t, t, **kwargs)

    def velocity(self, output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The velocity field from a model output of this transport's prediction type."""
        if self.prediction == "velocity":
            return output
        if self.prediction == "noise":
            return self.schedule.velocity_from_noise(output, x_t, t)
        return self.schedule.velocity_from_score(output, x_t, t)

    def score(self, output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The score from a model output of this transport's prediction type."""
        if self.prediction == "score":
            return output
        if self.prediction == "noise":
            return self.schedule.score_from_noise(output, x_t, t)
        return self.schedule.score_from_velocity(output, x_t, t)

    def _conversion_singular(self, t: float, device=None) -> bool:
        """Whether turning this prediction type into a velocity and a score divides
        by zero at t (a velocity model's score where beta = 0, a noise or score
        model's velocity where alpha = 0). One host sync."""
        one, tt = torch.ones(1, 1, device=device), torch.full((1,), t, device=device)
        return not all(bool(torch.isfinite(convert(one, one, tt)).all()) for convert in (self.velocity, self.score))

    # ---------------------------------------------------------- losses

    def training_losses(self, model: Callable, x: Tensor, model_kwargs: dict | None = None,
                        generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Draws t and eps (from `generator`, if given), runs the model on x_t and
        returns {"loss": per-sample loss [B] (float32, or float64 for float64 x
        or prediction), "pred": the model output, "t": t}. Velocity prediction
        goes through the fused velocity-MSE kernel, which never writes u_t."""
        t = self.sample_time(x.shape[0], x.device, generator,
                             torch.float64 if x.dtype == torch.float64 else torch.float32)
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        if self.fused:
            x_t = self.schedule.interpolant(x, noise, t, outputs=(True, False))[0]
        else:
            x_t = ref.interpolant(x, noise, coefficients=self.schedule.coefficients(t))[0]
        pred = self.call_model(model, x_t, t, model_kwargs)
        if pred.shape != x.shape:
            raise ValueError(f"the model returned shape {tuple(pred.shape)}; expected x's shape {tuple(x.shape)}")
        return {"loss": self.loss(pred, x, noise, t), "pred": pred, "t": t}

    def loss(self, pred: Tensor, x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """Per-sample loss of a prediction at (x, noise, t)."""
        if not self.fused:  # accumulate as the fused kernels do (a bfloat16 mean of squares loses ~3 digits)
            acc = torch.float64 if torch.float64 in (pred.dtype, x.dtype) else torch.float32
            pred, x, noise = pred.to(acc), x.to(acc), noise.to(acc)
        if self.prediction == "velocity":
            if self.fused:
                return self.schedule.velocity_mse(pred, x, noise, t)
            return ref.velocity_mse(pred, x, noise, coefficients=self.schedule.coefficients(t), reduction="none")
        a, b, _, _ = self.schedule.coefficients(t)
        zero = torch.zeros_like(t)
        # Noise: mean (pred - eps)^2; score: mean (pred b + eps)^2 = b^2 mean (pred + eps / b)^2.
        # Both are a velocity MSE with coefficients (a, b, 0, 1) or (a, b, 0, -1 / b).
        if self.prediction == "noise":
            coefficients, scale = (a, b, zero, torch.ones_like(t)), None
        else:
            coefficients, scale = (a, b, zero, -1.0 / b), b * b
        if self.fused:
            per_sample_loss = ops.velocity_mse(pred, x, noise, coefficients=coefficients, reduction="none")
        else:
            per_sample_loss = ref.velocity_mse(pred, x, noise, coefficients=coefficients, reduction="none")
        if scale is not None:  # in the loss's dtype (float32 would round a float64 loss's weighting)
            per_sample_loss = per_sample_loss * scale.to(per_sample_loss.dtype)
        if self.loss_weight is None:
            return per_sample_loss
        return per_sample_loss * self._loss_weight(t).to(per_sample_loss.dtype)

    def _loss_weight(self, t: Tensor) -> Tensor:
        _, b, _, _ = self.schedule.coefficients(t)
        _, w = self.schedule.sde(t)
        return (w / b) ** 2 if self.loss_weight == "velocity" else w / (b * b)

    # ------------------------------------------------------------ fields

    def _guided(self, model: Callable, model_kwargs: dict | None, cfg_scale: float,
                cfg_interval: tuple[float, float], null_label: int | None) -> Callable[[Tensor, Tensor], Tensor]:
        """model output at (x, t [B]), with classifier-free guidance when
        cfg_scale != 1: conditional and unconditional halves in one batch, mixed
        as uncond + scale (cond - uncond) for t in cfg_interval (cond elsewhere)."""
        kwargs = dict(model_kwargs or {})
        lo, hi = _interval_arg("cfg_interval", cfg_interval)
        if not math.isfinite(_number("cfg_scale", cfg_scale)):
            raise ValueError(f"cfg_scale must be finite, got {cfg_scale}")
        if cfg_scale == 1.0:
            return lambda x, t: self.call_model(model, x, t, kwargs)
        y = kwargs.pop("y", None)
        if y is None:
            raise ValueError("classifier-free guidance needs labels: pass model_kwargs={'y': labels}")
        if null_label is None:
            null_label = getattr(model, "num_classes", None)
            if null_label is None:
                raise ValueError("classifier-free guidance needs null_label= (the model has no num_classes)")
            table = getattr(getattr(model, "y_embedder", None), "embedding_table", None)
            if table is not None and null_label >= table.num_embeddings:
                raise ValueError("classifier-free guidance needs the model's null class, and this one has none "
                                 "(it was trained with class_dropout_prob=0, --class-dropout-prob 0)")
        both_y = torch.cat([y, torch.full_like(y, null_label)])

        def guided(x: Tensor, t: Tensor) -> Tensor:
            # repeat, not cat: autocast's cat refuses float16 x beside bfloat16 autocast
            out = self.call_model(model, x.repeat(2, *[1] * (x.dim() - 1)), t.repeat(2), {**kwargs, "y": both_y})
            cond, uncond = out.chunk(2)
            scale = torch.where((t >= lo) & (t <= hi), cfg_scale, 1.0)
            return uncond + per_sample(scale, x) * (cond - uncond)

        return guided

    def _velocity_field(self, output_fn) -> Field:
        return lambda x, t: self.velocity(output_fn(x, t), x, t)

    # --------------------------------------------------------------- ODE

    @torch.no_grad()
    def sample_ode(self, model: Callable, noise: Tensor, *, method: str = "heun", num_steps: int = 50,
                   schedule: str = "uniform", schedule_param: float | None = None,
                   atol: float = 1e-6, rtol: float = 1e-3, reverse: bool = False,
                   model_kwargs: dict | None = None, cfg_scale: float = 1.0,
                   cfg_interval: tuple[float, float] = (0.0, 1.0), null_label: int | None = None,
                   progress: bool = False, return_trajectory: bool = False, compile: bool = False,
                   cuda_graph: bool = False, sampler: TunedSampler | None = None):
        """Integrates the probability-flow ODE from noise (t = 1) to data (t = 0),
        or with reverse=True from data to noise. method: on a grid of num_steps
        steps spaced by `schedule` ("uniform", "shift", "power"; see ``time_grid``),
        "euler", "heun" (2 model evaluations a step), "adams" (1 a step, third
        order; see ``adams_sample``) or a torchdiffeq fixed-step method ("rk4",
        "midpoint", ...); or an adaptive torchdiffeq method ("dopri5", ...; atol and
        rtol pass through), which chooses its own steps. compile=True compiles the
        step (for "adams", the field) with torch.compile. cuda_graph=True captures
        the field (the model, guidance included, and the velocity) in one CUDA
        graph on its first evaluation and replays it on every later one (euler,
        heun and adams; the capture costs a few extra evaluations per call).
        sampler: a ``TunedSampler`` fitted to this model
        (``sit_ext.tuned.tune_sampler``), which replaces method, num_steps and
        schedule; it was fitted for one guidance setting, which the caller keeps.
        Returns x at the end, or every grid point with return_trajectory=True."""
        _tensor_arg("noise", noise)
        _count("num_steps", num_steps, 1)
        field = self._velocity_field(self._guided(model, model_kwargs, cfg_scale, cfg_interval, null_label))
        if cuda_graph:
            _check_graph_sampling("sample_ode", noise, compile, method, (*ODE_FIXED, "adams"))
            field = GraphedField(field, "sample_ode(cuda_graph=True)")
        lo, hi = self.interval(sample=True)
        if sampler is not None:
            if not isinstance(sampler, TunedSampler):
                raise TypeError(f"sampler must be a TunedSampler, got {type(sampler).__name__}")
            if reverse or list(sampler.settings["interval"]) != [hi, lo]:
                raise ValueError(f"the sampler integrates from t = {sampler.settings['interval'][0]} to "
                                 f"{sampler.settings['interval'][1]}; this transport samples from {hi} to {lo}"
                                 + (" (reverse=True)" if reverse else ""))
            if compile:
                raise ValueError("compile=True compiles the fixed-step solvers; a tuned sampler runs eagerly")
            return tuned_sample(field, noise, sampler, progress, return_trajectory)
        t0, t1 = (lo, hi) if reverse else (hi, lo)
        if method not in (*ODE_FIXED, "adams", *TORCHDIFFEQ_FIXED):
            if schedule != "uniform":
                raise ValueError(f"schedule={schedule!r} needs a fixed-step method; {method!r} chooses its own steps")
            if not (atol >= 0 and rtol >= 0 and atol + rtol > 0):
                raise ValueError(f"atol and rtol must be >= 0, not both 0, got atol={atol}, rtol={rtol}")
            return _odeint(field, noise, torch.tensor([t0, t1], dtype=torch.float64, device=noise.device),
                           method, atol, rtol, return_trajectory)
        grid = time_grid(t0, t1, num_steps + 1, schedule, schedule_param, noise.device)
        if method in TORCHDIFFEQ_FIXED:
            return _odeint(field, noise, grid.double(), method, atol, rtol, return_trajectory)
        if method == "adams":
            field = field if not compile else torch.compile(field, dynamic=False)
            return adams_sample(field, noise, grid, progress, return_trajectory)
        return fixed_step_sample(field, noise, grid, method, progress, return_trajectory, compile)

    # --------------------------------------------------------------- SDE

    def diffusion(self, t: Tensor, form: str = "SBDM", norm: float = 1.0) -> Tensor:
        """w(t) [B] of a diffusion form (the official forms, in this time convention)."""
        _choose("diffusion_form", form, DIFFUSION_FORMS)
        if form == "constant":
            return torch.full_like(t, norm)
        if form == "SBDM":
            return norm * self.schedule.sde(t)[1]
        if form == "sigma":
            return norm * self.schedule.coefficients(t)[1]
        if form == "linear":
            return norm * t
        if form == "decreasing":
            return 0.25 * (1 - norm * torch.cos(math.pi * t)) ** 2
        return norm * torch.sin(math.pi * t) ** 2  # increasing-decreasing

    @torch.no_grad()
    def sample_sde(self, model: Callable, noise: Tensor, *, method: str = "euler", num_steps: int = 250,
                   schedule: str = "uniform", schedule_param: float | None = None,
                   diffusion_form: str = "sigma", diffusion_norm: float = 1.0, last_step: str | None = "Mean",
                   last_step_size: float = 0.04, generator: torch.Generator | None = None,
                   model_kwargs: dict | None = None, cfg_scale: float = 1.0,
                   cfg_interval: tuple[float, float] = (0.0, 1.0), null_label: int | None = None,
                   progress: bool = False, return_trajectory: bool = False, compile: bool = False,
                   cuda_graph: bool = False):
        """Integrates the SDE from noise to data: Euler-Maruyama ("euler") or
        stochastic Heun ("heun"; a step that ends where the score or velocity
        conversion is singular skips the correction), on num_steps grid points
        from t_hi down to t_lo spaced by `schedule` (see ``time_grid``), then
        `last_step` ("Mean", "Tweedie", "Euler" or None) to t = 0. The defaults are
        the official sampler's (uniform grid, diffusion "sigma", last step "Mean" of
        size 0.04). For data with a small variance, last_step=None and
        schedule="power" keep the variance: "Mean" drops the noise of its whole
        step, and uniform steps are too long where w / beta^2 is large.
        cuda_graph=True captures the model's evaluation (guidance included) in
        one CUDA graph, as sample_ode does; the noise is drawn outside it."""
        _choose("SDE method", method, SDE_METHODS)
        _choose("diffusion_form", diffusion_form, DIFFUSION_FORMS)
        _choose("last_step", last_step, LAST_STEPS)
        _tensor_arg("noise", noise)
        _count("num_steps", num_steps, 2)
        if not diffusion_norm >= 0:
            raise ValueError(f"diffusion_norm must be >= 0, got {diffusion_norm}")
        if last_step is not None and not 0 < last_step_size < 1:
            raise ValueError(f"last_step_size must be in (0, 1) with a last step, got {last_step_size}")
        output_fn = self._guided(model, model_kwargs, cfg_scale, cfg_interval, null_label)
        if cuda_graph:
            _check_graph_sampling("sample_sde", noise, compile, method, SDE_METHODS)
            output_fn = GraphedField(output_fn, "sample_sde(cuda_graph=True)")

        def drift(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            out = output_fn(x, t)
            v, s = self.velocity(out, x, t), self.score(out, x, t)
            w = per_sample(self.diffusion(t, diffusion_form, diffusion_norm), x)
            return -v + w * s, v, s

        lo, hi = self.interval(sample=True, sde=True, diffusion_form=diffusion_form,
                               last_step_size=last_step_size if last_step else 0.0)
        grid = time_grid(hi, lo, num_steps, schedule, schedule_param, noise.device)
        skip_last_correction = method == "heun" and self._conversion_singular(lo, noise.device)
        path = [noise]
        x = sde_sample(drift, self.diffusion, noise, grid, method, diffusion_form, diffusion_norm,
                       skip_last_correction, generator, progress, path if return_trajectory else None, compile)
        if last_step is not None:
            t = grid[-1].expand(x.shape[0])
            d, v, s = drift(x, t)
            if last_step == "Mean":
                x = x + d * last_step_size
            elif last_step == "Euler":
                x = x - v * last_step_size
            else:  # Tweedie: E[x | x_t]
                x = self.schedule.expected_data(s, x, t)
            if return_trajectory:
                path.append(x)
        return _finish(x, path, noise.dtype, return_trajectory)

    # -------------------------------------------------------- likelihood

    def log_likelihood(self, model: Callable, x: Tensor, *, method: str = "heun", num_steps: int = 100,
                       exact: bool | None = None, num_probes: int = 1, atol: float = 1e-6, rtol: float = 1e-3,
                       generator: torch.Generator | None = None, model_kwargs: dict | None = None,
                       progress: bool = False) -> dict[str, Tensor]:
        """log p(x) [B] in nats, through the probability-flow ODE from data to
        noise: log p_0(x) = log N(x_1; 0, beta(1)^2) + int_0^1 div v(x_t, t) dt.
        The divergence is exact (one backward pass per dimension; the default
        for up to 16 dimensions) or Hutchinson's estimate with `num_probes`
        Rademacher probes. Also returns bits_per_dim = -log p / (D ln 2) and the
        prior term."""
        _tensor_arg("x", x)
        _count("num_steps", num_steps, 1)
        _count("num_probes", num_probes, 1)
        field = self._velocity_field(self._guided(model, model_kwargs, 1.0, (0.0, 1.0), None))
        dims = x[0].numel()
        exact = dims <= 16 if exact is None else exact
        probes = None
        if not exact:
            probes = torch.randint(0, 2, (num_probes, *x.shape), device=x.device, generator=generator)
            probes = (2 * probes - 1).to(x.dtype)

        def augmented(state: tuple[Tensor, Tensor], t: Tensor) -> tuple[Tensor, Tensor]:
            xt = state[0].detach().requires_grad_(True)
            with torch.enable_grad():
                v = field(xt, t)
                div = _divergence(v, xt, probes)
            return v.detach(), div.detach()

        lo, hi = self.interval(sample=True)
        state = (x, torch.zeros(x.shape[0], device=x.device, dtype=torch.float64))
        grid = torch.linspace(lo, hi, num_steps + 1, device=x.device, dtype=torch.float32)
        if method in ODE_FIXED:
            for i in _progress(range(num_steps), progress, "likelihood"):
                state = ode_step(augmented, state, grid[i], grid[i + 1], method)
        else:
            times = grid.double() if method in TORCHDIFFEQ_FIXED else torch.tensor([lo, hi], dtype=torch.float64,
                                                                                    device=x.device)
            state = _odeint(augmented, state, times, method, atol, rtol, False)
        z, integral = state
        std = self.schedule.coefficients(torch.full((1,), hi, device=x.device))[1].double()
        prior = (-0.5 * (z.double() / std) ** 2 - torch.log(std) - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)
        logp = prior + integral
        return {"logp": logp, "bits_per_dim": -logp / (dims * math.log(2)), "prior_logp": prior, "z": z}


def _divergence(v: Tensor, x: Tensor, probes: Tensor | None) -> Tensor:
    """div_x v per sample: exact (a backward pass per dimension) or Hutchinson."""
    if probes is None:
        flat = v.flatten(1)
        div = torch.zeros(x.shape[0], device=x.device, dtype=torch.float64)
        for i in range(flat.shape[1]):
            (g,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)
            div = div + g.flatten(1)[:, i].double()
        return div
    total = torch.zeros(x.shape[0], device=x.device, dtype=torch.float64)
    for probe in probes:
        (g,) = torch.autograd.grad(v, x, probe, retain_graph=True)
        total = total + (g * probe).flatten(1).sum(1).double()
    return total / len(probes)


def _check_graph_sampling(what: str, noise: Tensor, compile: bool, method: str, methods: tuple[str, ...]) -> None:
    """What a captured field cannot do, refused in one line before any work."""
    if compile:
        raise ValueError(f"{what}: cuda_graph=True and compile=True: pass one (a CUDA graph replays the eager "
                         "kernels; compile's mode='reduce-overhead' makes its own graphs)")
    if method not in methods:
        raise ValueError(f"{what}: cuda_graph=True needs a fixed-step method ({', '.join(methods)}), got "
                         f"{method!r}: torchdiffeq's solvers choose their steps and evaluation points on the host")
    check_device(noise.device, f"{what}(cuda_graph=True)")


def create_transport(path_type: str = "Linear", prediction: str = "velocity", loss_weight: str | None = None,
                     train_eps: float | None = None, sample_eps: float | None = None) -> Transport:
    """The official create_transport's signature ("Linear", "GVP", "VP")."""
    return Transport(path_type, prediction, loss_weight, train_eps, sample_eps)


__all__ = ["Transport", "adams_sample", "create_transport", "ode_step", "sde_step", "time_grid"]
