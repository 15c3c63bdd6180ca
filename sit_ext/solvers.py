"""The solvers behind ``Transport``'s samplers: fixed-step ODE loops (Euler,
Heun, Adams), the SDE loop, torchdiffeq's solvers, step schedules, and the
tuned sampler (``TunedSampler``, fitted by ``sit_ext.tuned.tune_sampler``).

Each solver integrates a field(x, t [B]) given to it; ``Transport`` builds the
field from a model (prediction type, guidance, time convention) and calls them.
Times are 0-d tensors inside the loops, so a step never syncs with the host.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .schedules import per_sample

STEP_SCHEDULES = {"uniform": None, "shift": 3.0, "power": 2.0}  # name: default schedule_param

Field = Callable[[Tensor, Tensor], Tensor]

def _choose(name: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"unknown {name} {value!r}: expected one of {list(options)}")



def time_grid(start: float, end: float, num_points: int, schedule: str = "uniform", param: float | None = None,
              device=None) -> Tensor:
    """num_points times (float32) from start to end, both included. With u
    uniform on [0, 1] (0 at lo = min(start, end), the data end):

    - "uniform": torch.linspace(start, end, num_points);
    - "shift": t = lo + (hi - lo) s u / (1 + (s - 1) u), the timestep shift of flow
      models (param s, default 3): s > 1 puts the steps at the noise end, s < 1 at
      the data end;
    - "power": t = (lo^(1/rho) + u (hi^(1/rho) - lo^(1/rho)))^rho, EDM's spacing
      rule applied to t (param rho, default 2): steps concentrated at the data end.
    """
    _choose("schedule", schedule, STEP_SCHEDULES)
    if schedule == "uniform":
        return torch.linspace(start, end, num_points, device=device, dtype=torch.float32)
    p = STEP_SCHEDULES[schedule] if param is None else float(param)
    if not p > 0:
        raise ValueError(f"schedule_param must be > 0, got {param}")
    lo, hi = min(start, end), max(start, end)
    u = torch.linspace(0, 1, num_points, dtype=torch.float64)
    u = u.flip(0) if start > end else u
    if schedule == "shift":
        t = lo + (hi - lo) * p * u / (1 + (p - 1) * u)
    else:
        t = (lo ** (1 / p) + u * (hi ** (1 / p) - lo ** (1 / p))) ** p
    t[0], t[-1] = start, end
    return t.to(device=device, dtype=torch.float32)


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError as e:  # pragma: no cover - tqdm is a dependency
        raise ImportError("progress=True needs tqdm: pip install tqdm") from e
    return tqdm(iterable, desc=desc, leave=False)


def _axpy(a: Tensor, y, x):
    """a * y + x, for a tensor state or a tuple of them (the likelihood's)."""
    if isinstance(x, tuple):
        return tuple(a * yi + xi for yi, xi in zip(y, x))
    return a * y + x


def ode_step(field, x, t_cur: Tensor, t_next: Tensor, method: str):
    """One Euler or Heun step of dx/dt = field(x, t [B]) from t_cur to t_next
    (0-d tensors, so the step never syncs with the host)."""
    batch = (x[0] if isinstance(x, tuple) else x).shape[0]
    dt = t_next - t_cur
    d1 = field(x, t_cur.expand(batch))
    x_euler = _axpy(dt, d1, x)
    if method == "euler":
        return x_euler
    d2 = field(x_euler, t_next.expand(batch))
    if isinstance(x, tuple):
        return _axpy(dt / 2, tuple(a + b for a, b in zip(d1, d2)), x)
    return _axpy(dt / 2, d1 + d2, x)


def fixed_step_sample(field: Field, x: Tensor, grid: Tensor, method: str, progress: bool = False,
                      return_trajectory: bool = False, compile: bool = False):
    """Euler or Heun steps of dx/dt = field(x, t [B]) over `grid`; compile=True
    compiles the step with torch.compile."""
    step = ode_step if not compile else torch.compile(ode_step, dynamic=False)
    noise, path = x, [x]
    for i in _progress(range(len(grid) - 1), progress, "ODE"):
        x = step(field, x, grid[i], grid[i + 1], method)
        if return_trajectory:
            path.append(x)
    return _finish(x, path, noise.dtype, return_trajectory)


def adams_sample(field: Field, x: Tensor, grid: Tensor, progress: bool = False, return_trajectory: bool = False):
    """Integrates dx/dt = field(x, t [B]) over `grid` with one evaluation per
    step: an Adams-Bashforth 2 predictor and an Adams-Moulton 3 corrector in PEC
    mode (the evaluation at the predicted point serves the corrector and the next
    predictor). With h = t_next - t, h_p the previous step, v_p, v, v_n the field at
    the previous, current and predicted points:

    - predictor: x + h ((1 + r / 2) v - (r / 2) v_p), r = h / h_p (Euler on the first step);
    - corrector: x + w_n v_n + (h - w_n - w_p) v + w_p v_p, the integral of the
      quadratic through the three, w_n = h (2 h + 3 h_p) / (6 (h + h_p)),
      w_p = -h^3 / (6 h_p (h + h_p)) (the trapezoid on the first step);
    - the last step keeps its prediction (a correction would cost an evaluation).
    """
    h = torch.diff(grid.double().cpu()).tolist()
    batch, path = x.shape[0], [x]
    v = field(x, grid[0].expand(batch))
    v_p = None
    for i in _progress(range(len(h)), progress, "ODE"):
        dt, dt_p = h[i], h[i - 1] if i else None
        x_pred = x + dt * v if v_p is None else x + dt * ((1 + dt / (2 * dt_p)) * v - dt / (2 * dt_p) * v_p)
        if i == len(h) - 1:
            x = x_pred
        else:
            v_n = field(x_pred, grid[i + 1].expand(batch))
            if v_p is None:
                x = x + dt / 2 * (v + v_n)
            else:
                w_n, w_p = dt * (2 * dt + 3 * dt_p) / (6 * (dt + dt_p)), -(dt**3) / (6 * dt_p * (dt + dt_p))
                x = x + w_n * v_n + (dt - w_n - w_p) * v + w_p * v_p
            v_p, v = v, v_n
        if return_trajectory:
            path.append(x)
    return _finish(x, path, path[0].dtype, return_trajectory)


def _finish(x: Tensor, path: list[Tensor], dtype: torch.dtype, trajectory: bool) -> Tensor:
    """The samples in the noise's dtype (a step may promote them: float16
    noise with a model that predicts in bfloat16 or float32), or the trajectory
    stacked in it, outside autocast (whose stack refuses float16 beside a
    bfloat16 autocast)."""
    if not trajectory:
        return x.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        return torch.stack([p.to(dtype) for p in path])


def sde_step(drift, diffusion, x: Tensor, z: Tensor, t_cur: Tensor, t_next: Tensor, method: str,
             form: str, norm: float, correct: bool = True) -> Tensor:
    """One Euler-Maruyama or stochastic Heun step toward the data, from t_cur
    down to t_next, with standard normal noise z. correct=False stops Heun after
    its predictor (for a step that ends where the drift is singular)."""
    batch = x.shape[0]
    h = t_cur - t_next
    t = t_cur.expand(batch)
    noise = per_sample(torch.sqrt(2 * diffusion(t, form, norm) * h), x) * z
    if method == "euler":
        return x + drift(x, t)[0] * h + noise
    x_hat = x + noise
    k1 = drift(x_hat, t)[0]
    if not correct:
        return x_hat + h * k1
    k2 = drift(x_hat + h * k1, t_next.expand(batch))[0]
    return x_hat + h / 2 * (k1 + k2)


def sde_sample(drift, diffusion, x: Tensor, grid: Tensor, method: str, form: str, norm: float,
               skip_last_correction: bool, generator: torch.Generator | None, progress: bool = False,
               path: list[Tensor] | None = None, compile: bool = False) -> Tensor:
    """Euler-Maruyama or stochastic Heun steps toward the data over `grid` (see
    ``sde_step``), fresh standard normal noise from `generator` each step;
    skip_last_correction stops the last Heun step after its predictor. Appends
    each step's x to `path` when given."""
    step = sde_step if not compile else torch.compile(sde_step, dynamic=False)
    steps = len(grid) - 1
    for i in _progress(range(steps), progress, "SDE"):
        z = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        correct = not (skip_last_correction and i == steps - 1)
        x = step(drift, diffusion, x, z, grid[i], grid[i + 1], method, form, norm, correct)
        if path is not None:
            path.append(x)
    return x


def _odeint(field, x0, times: Tensor, method: str, atol: float, rtol: float, trajectory: bool):
    """torchdiffeq's odeint through `times` (float64): the grid of a fixed-step
    method, or the two ends for an adaptive one. Adaptive methods evaluate stages
    past the end (they overshoot and interpolate back); the field is held at the
    interval's ends there, where a path or its conversions may be undefined (VP:
    alpha > 1 for -0.01 < t < 0) and no model was trained."""
    try:
        from torchdiffeq import odeint
    except ImportError:
        raise ImportError(f"ODE method {method!r} needs torchdiffeq, which is not installed: "
                          "pip install torchdiffeq (or use method='euler' or 'heun')") from None
    first = x0[0] if isinstance(x0, tuple) else x0
    lo, hi = times.aminmax()
    try:
        out = odeint(lambda t, x: field(x, t.clamp(lo, hi).float().expand(first.shape[0])), x0, times,
                     method=method, atol=atol, rtol=rtol)
    except ValueError as e:
        if not str(e).startswith("Invalid method"):
            raise
        raise ValueError(f"unknown ODE method {method!r}: expected euler, heun, adams, or one of torchdiffeq's "
                         f"({str(e).split('one of ')[-1].rstrip('.')})") from None
    except AssertionError as e:  # torchdiffeq's "underflow in dt": the tolerances cannot be met
        raise ValueError(f"the adaptive solver {method!r} could not meet atol={atol}, rtol={rtol} ({e}): loosen "
                         "them, or use a fixed-step method") from None
    if isinstance(out, tuple):
        return tuple(o[-1] for o in out)
    return out if trajectory else out[-1]


# ---------------------------------------------------------------- tuned

TUNED_BASES = {"heun": 3, "adams": 5}  # base solver: weights per step


class TunedSampler:
    """A sampler fitted to one model (``sit_ext.tuned.tune_sampler``): the
    base solver ("heun" or "adams") on a learned time grid, in a learned
    scale-time frame (Bespoke Solvers, Shaul et al. 2024), with learned step
    weights. params (float64):

    - "grid_logits" [n]: step i takes the share softmax(logits)_i of the interval;
    - "log_scale" [n]: log s at nodes 1..n (s = 1 at the start); the solver
      carries xbar = s x and evaluates u(xbar / s, t);
    - "scale_rate" [evaluations]: ds/dt / s at each evaluation, the drift
      sigma xbar of the scaled field sigma xbar + s u(xbar / s, t);
    - "weights" [n, k]: each step's weights are the base solver's (from the
      grid) times (1 + these).

    All zero but the logits (log of the base grid's shares): the base solver
    exactly, up to float64 rounding. settings: JSON-able facts (base, steps,
    nfe, interval, and what the fit recorded)."""

    def __init__(self, params: dict[str, Tensor], settings: dict):
        base, steps = settings.get("base"), settings.get("steps")
        _choose("base solver", base, TUNED_BASES)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < (2 if base == "adams" else 1):
            raise ValueError(f"a tuned {base} sampler needs an integer number of steps, got {steps!r}")
        shapes = {"grid_logits": (steps,), "log_scale": (steps,),
                  "scale_rate": (2 * steps if base == "heun" else steps,), "weights": (steps, TUNED_BASES[base])}
        if set(params) != set(shapes):
            raise ValueError(f"a tuned sampler's params are {sorted(shapes)}, got {sorted(params)}")
        for name, shape in shapes.items():
            if not isinstance(params[name], Tensor) or tuple(params[name].shape) != shape:
                raise ValueError(f"tuned sampler param {name!r} must be a Tensor of shape {shape}")
            if not torch.isfinite(params[name]).all():
                raise ValueError(f"tuned sampler param {name!r} holds NaN or infinite values")
        interval = settings.get("interval")
        if not (isinstance(interval, (list, tuple)) and len(interval) == 2):
            raise ValueError(f"a tuned sampler's settings need its interval [t_start, t_end], got {interval!r}")
        self.params, self.settings = params, dict(settings)

    @property
    def base(self) -> str:
        return self.settings["base"]

    @property
    def nfe(self) -> int:
        return self.settings["steps"] * (2 if self.base == "heun" else 1)

    def grid(self, device=None) -> Tensor:
        """The time grid [n + 1] (float64), from t_start to t_end exactly."""
        start, end = (float(v) for v in self.settings["interval"])
        share = torch.cumsum(torch.softmax(self.params["grid_logits"].to(device), 0), 0)[:-1]
        ends = share.new_tensor([start]), share.new_tensor([end])
        return torch.cat([ends[0], start + (end - start) * share, ends[1]])

    def __repr__(self) -> str:
        return f"TunedSampler(base={self.base!r}, nfe={self.nfe}, interval={self.settings['interval']})"


def _base_weights(base: str, h: Tensor, i: int) -> list[Tensor]:
    """Step i's weights of the base solver on steps h (see ``ode_step`` and ``adams_sample``):
    heun (Euler step, then the two stages' halves); adams (predictor on v, v_p; corrector
    on v_n, v, v_p)."""
    dt = h[i]
    if base == "heun":
        return [dt, dt / 2, dt / 2]
    zero = torch.zeros_like(dt)
    if i == 0:
        return [dt, zero, dt / 2, dt / 2, zero]
    dt_p = h[i - 1]
    r = dt / dt_p
    w_n, w_p = dt * (2 * dt + 3 * dt_p) / (6 * (dt + dt_p)), -(dt**3) / (6 * dt_p * (dt + dt_p))
    return [dt * (1 + r / 2), -dt * r / 2, w_n, dt - w_n - w_p, w_p]


def tuned_sample(field: Field, x: Tensor, sampler: TunedSampler, progress: bool = False,
                 return_trajectory: bool = False):
    """Integrates dx/dt = field(x, t [B]) with a tuned sampler (differentiable
    in its params; the model is evaluated at float32 times, as the base solvers
    evaluate it) on x's device. Returns x at the end, or x at every node."""
    p = {k: v.to(x.device) for k, v in sampler.params.items()}  # a no-op, gradients kept, where they are
    grid = sampler.grid(x.device)
    h = torch.diff(grid)
    scale = torch.cat([torch.ones_like(p["log_scale"][:1]), torch.exp(p["log_scale"])])
    rate, factor = p["scale_rate"], 1 + p["weights"]
    batch, noise, path = x.shape[0], x, [x]
    times = grid.float()

    def scaled(xbar: Tensor, node: int, evaluation: int) -> Tensor:
        """sigma xbar + s u(xbar / s, t) at a node: the field in the scaled frame."""
        return rate[evaluation] * xbar + scale[node] * field(xbar / scale[node], times[node].expand(batch))

    steps = len(h)
    if sampler.base == "heun":
        for i in _progress(range(steps), progress, "ODE"):
            a, b, c = (w * f for w, f in zip(_base_weights("heun", h, i), factor[i]))
            d1 = scaled(x, i, 2 * i)
            d2 = scaled(x + a * d1, i + 1, 2 * i + 1)
            x = x + b * d1 + c * d2
            if return_trajectory:
                path.append(x / scale[i + 1])
    else:
        v, v_p = scaled(x, 0, 0), None
        for i in _progress(range(steps), progress, "ODE"):
            w = [wi * f for wi, f in zip(_base_weights("adams", h, i), factor[i])]
            x_pred = x + w[0] * v if v_p is None else x + w[0] * v + w[1] * v_p
            if i == steps - 1:
                x = x_pred
            else:
                v_n = scaled(x_pred, i + 1, i + 1)
                x = x + w[2] * v_n + w[3] * v if v_p is None else x + w[2] * v_n + w[3] * v + w[4] * v_p
                v_p, v = v, v_n
            if return_trajectory:
                path.append(x / scale[i + 1])
    x = x / scale[-1]
    return _finish(x, path, noise.dtype, return_trajectory)
