"""A sampler tuned to one model: ``tune_sampler`` fits a ``TunedSampler``
(see ``sit_ext.solvers``) to the model's own trajectories, and
``save_sampler`` / ``load_sampler`` keep it in a .safetensors file.

The fit minimises the endpoint distance sqrt(mean_i |x_i - ref_i|^2) to an
accurate solve of the same noise (many small Adams steps by default) with
Adam on the sampler's float64 params; gradients reach the params through the
model's input and time, never its weights. It starts from the base solver
exactly, checks a held-out batch every few iterations, stops when that error
has not improved for `patience` checks, and returns the params with the
lowest held-out error, the start among them: on the held-out batch a fit is
never worse than the base solver.

The reference endpoints do not depend on the NFE: ``solve_reference`` computes
them once, and ``tune_sampler(..., reference_endpoints=...)`` reuses them for
every NFE fitted on the same noise.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .solvers import TUNED_BASES, TunedSampler, time_grid, tuned_sample
from .transport import Transport

# The accurate solve: Adams (third order), 256 steps leaning to the data end. On the 8-mode mixture its
# error to the exact flow is 6e-6 (Heun@50's: 3e-3); dopri5 at tolerance 1e-6 took longer there.
DEFAULT_REFERENCE = {"method": "adams", "num_steps": 256, "schedule": "shift", "schedule_param": 0.5}
FORMAT = "sit_ext tuned sampler 1"


def _counted(model: Callable, counter: list[int]) -> Callable:
    """The model, counting the rows it evaluates (guidance runs two per sample)."""
    def counted(x, t, **kwargs):
        counter[0] += x.shape[0]
        return model(x, t, **kwargs)

    return counted


def initial_sampler(transport: Transport, nfe: int, base: str = "adams", schedule: str = "uniform",
                    schedule_param: float | None = None) -> TunedSampler:
    """The base solver on `schedule`'s grid as a TunedSampler (all params at their start)."""
    if base not in TUNED_BASES:
        raise ValueError(f"unknown base {base!r}: expected one of {list(TUNED_BASES)}")
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 2:
        raise ValueError(f"nfe must be an integer >= 2, got {nfe!r}")
    if base == "heun" and nfe % 2:
        raise ValueError(f"nfe must be even for base 'heun' (2 evaluations a step), got {nfe}")
    steps = nfe // 2 if base == "heun" else nfe
    lo, hi = transport.interval(sample=True)
    grid = time_grid(hi, lo, steps + 1, schedule, schedule_param).double()
    share = torch.diff(grid) / (lo - hi)
    params = {"grid_logits": share.log(), "log_scale": torch.zeros(steps, dtype=torch.float64),
              "scale_rate": torch.zeros(2 * steps if base == "heun" else steps, dtype=torch.float64),
              "weights": torch.zeros(steps, TUNED_BASES[base], dtype=torch.float64)}
    settings = {"format": FORMAT, "base": base, "steps": steps, "nfe": nfe, "interval": [hi, lo],
                "base_schedule": [schedule, schedule_param]}
    return TunedSampler(params, settings)


def endpoint_rms(x: Tensor, reference: Tensor) -> float:
    """sqrt(mean_i |x_i - ref_i|^2) over samples i (each sample's norm over all its elements)."""
    return (x.double() - reference.double()).flatten(1).pow(2).sum(1).mean().sqrt().item()


def _check_batches(noise_batches: Sequence[Tensor], model_kwargs) -> tuple[list[Tensor], list]:
    """The noise batches as a list and one model_kwargs entry per batch; ValueError if they do not fit."""
    batches = list(noise_batches)
    if len(batches) < 2 or not all(isinstance(z, Tensor) for z in batches):
        raise ValueError("noise_batches must hold at least two noise tensors (the last is held out)")
    if any(z.shape[1:] != batches[0].shape[1:] for z in batches):
        raise ValueError("noise_batches must share one sample shape")
    if isinstance(model_kwargs, Sequence) and not isinstance(model_kwargs, dict):
        kwargs = list(model_kwargs)
        if len(kwargs) != len(batches):
            raise ValueError(f"model_kwargs: one dict per noise batch ({len(batches)}), got {len(kwargs)}")
    else:
        kwargs = [model_kwargs] * len(batches)
    return batches, kwargs


def solve_reference(transport: Transport, model: Callable, noise_batches: Sequence[Tensor], *,
                    model_kwargs: dict | Sequence[dict] | None = None, cfg_scale: float = 1.0,
                    cfg_interval: tuple[float, float] = (0.0, 1.0), null_label: int | None = None,
                    reference: dict | None = None) -> list[Tensor]:
    """The accurate solve of each noise batch (`reference`: sample_ode's
    arguments, DEFAULT_REFERENCE by default) under the guidance given: the
    ``reference_endpoints`` that ``tune_sampler`` takes. They do not depend on
    the NFE, so one set serves every NFE fitted on the same noise."""
    batches, kwargs = _check_batches(noise_batches, model_kwargs)
    reference = dict(DEFAULT_REFERENCE if reference is None else reference)
    with torch.no_grad():
        return [transport.sample_ode(model, z, model_kwargs=kwargs[i], cfg_scale=cfg_scale, cfg_interval=cfg_interval,
                                     null_label=null_label, **reference) for i, z in enumerate(batches)]


def iterations_within(budget_rows: float, nfe: int, fit_rows: int, heldout_rows: int, reference_rows: int = 0,
                      eval_every: int = 5) -> int:
    """The largest `iterations` for ``tune_sampler`` (L-BFGS) whose model
    rows stay within budget_rows: the fit's evaluations, the held-out checks
    and reference_rows for the reference solve. fit_rows and heldout_rows: the
    rows of one model evaluation of all fitted batches and of the held-out
    batch (guidance: twice the samples). 0 when not even one evaluation fits.

    Checks: the base's, then one after each L-BFGS step; the first step takes
    the start's evaluation and eval_every more, each later one at least
    eval_every (the point it starts from is already evaluated), so k
    evaluations make at most ceil((k - 1) / eval_every) steps."""
    def rows(k):
        return reference_rows + nfe * (k * fit_rows + (1 + -(-(k - 1) // eval_every)) * heldout_rows)

    k = 0
    while rows(k + 1) <= budget_rows:
        k += 1
    return k


def tune_sampler(transport: Transport, model: Callable, noise_batches: Sequence[Tensor], nfe: int,
                 base: str = "adams", *, schedule: str = "uniform", schedule_param: float | None = None,
                 model_kwargs: dict | Sequence[dict] | None = None, cfg_scale: float = 1.0,
                 cfg_interval: tuple[float, float] = (0.0, 1.0), null_label: int | None = None,
                 reference: dict | None = None, reference_endpoints: Sequence[Tensor] | None = None,
                 optimizer: str = "lbfgs", iterations: int = 200, lr: float | None = None, eval_every: int = 5,
                 patience: int = 4, progress: bool = True) -> TunedSampler:
    """Fits a sampler of `nfe` model evaluations to `model` under `transport`.

    noise_batches: at least two noise tensors; the last is held out (early
    stopping and the acceptance check), the others are fitted in turn.
    model_kwargs: one dict for every batch, or one per batch (labels). base
    "adams" (nfe steps) or "heun" (nfe / 2 steps) on `schedule`'s grid is the
    start. reference: sample_ode's arguments for the accurate solve (default
    DEFAULT_REFERENCE; {"method": "dopri5", "atol": ..., "rtol": ...} also
    serves). reference_endpoints: that solve already done, one tensor per
    noise batch shaped like it (``solve_reference``); then no reference solve
    runs here and `reference` only labels the settings. Guidance (cfg_scale,
    cfg_interval, null_label) as sample_ode takes it: the sampler is fitted to
    that field. optimizer: "lbfgs" (every training batch each evaluation, lr 1
    by default) or "adam" (one batch in turn, lr 0.02); iterations caps the
    loss-and-gradient evaluations (L-BFGS line searches included); the
    held-out batch is checked every `eval_every` of them.

    Returns the TunedSampler; its settings record the fit: held-out RMS of the
    fit and of the base solver, whether the fit was accepted, iterations,
    model evaluations in rows ("fit_evaluations" also ran a backward pass;
    "reference_evaluations" and "heldout_evaluations" did not, and
    "other_evaluations" is their sum) and seconds."""
    start = initial_sampler(transport, nfe, base, schedule, schedule_param)
    batches, kwargs = _check_batches(noise_batches, model_kwargs)
    if reference_endpoints is not None:
        given = list(reference_endpoints) if isinstance(reference_endpoints, Sequence) else None
        if given is None or len(given) != len(batches) or not all(isinstance(r, Tensor) for r in given):
            raise ValueError(f"reference_endpoints must hold one tensor per noise batch ({len(batches)}), got "
                             f"{len(given) if given is not None else type(reference_endpoints).__name__}")
        for i, (r, z) in enumerate(zip(given, batches)):
            if r.shape != z.shape:
                raise ValueError(f"reference_endpoints[{i}] has shape {tuple(r.shape)}; noise batch {i} has "
                                 f"{tuple(z.shape)}")
    for name, value, least in (("iterations", iterations, 0), ("eval_every", eval_every, 1), ("patience", patience, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if optimizer not in ("lbfgs", "adam"):
        raise ValueError(f"unknown optimizer {optimizer!r}: expected 'lbfgs' or 'adam'")
    lr = (1.0 if optimizer == "lbfgs" else 0.02) if lr is None else lr
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if reference is not None or reference_endpoints is None:
        reference = dict(DEFAULT_REFERENCE if reference is None else reference)
    else:
        reference = "given"  # endpoints passed in; how they were solved is the caller's to record

    t0 = time.perf_counter()
    solved, free, fit = [0], [0], [0]
    free_model, fit_model = _counted(model, free), _counted(model, fit)
    guidance = dict(cfg_scale=cfg_scale, cfg_interval=cfg_interval, null_label=null_label)

    def field(counted_model, i):
        return transport._velocity_field(transport._guided(counted_model, kwargs[i], **guidance))

    device = batches[0].device
    if reference_endpoints is None:
        targets = solve_reference(transport, _counted(model, solved), batches, model_kwargs=kwargs, **guidance,
                                  reference=reference)
    else:
        targets = [r.detach() for r in reference_endpoints]
    params = {k: v.to(device).clone().requires_grad_(True) for k, v in start.params.items()}
    sampler = TunedSampler(params, start.settings)

    def held_out(candidate: dict[str, Tensor]) -> float:
        with torch.no_grad():
            return endpoint_rms(tuned_sample(field(free_model, -1), batches[-1],
                                             TunedSampler(candidate, start.settings)), targets[-1])

    best = {k: v.detach().clone() for k, v in params.items()}
    base_rms = best_rms = held_out(best)
    train = list(range(len(batches) - 1))
    names, values = list(params), list(params.values())
    if optimizer == "lbfgs":
        # max_eval: the step's first evaluation (the point the last one ended on, free) and eval_every more
        opt = torch.optim.LBFGS(values, lr=lr, max_iter=eval_every, max_eval=eval_every + 1, history_size=20,
                                line_search_fn="strong_wolfe")
    else:
        opt = torch.optim.Adam(values, lr=lr)
    # lowest: the params with the lowest fit loss so far (L-BFGS's held-out candidate); seen: recent
    # (params, loss, grads), since each L-BFGS step re-evaluates the point the last one ended on
    state = {"loss": math.nan, "step": 0, "lowest": math.inf, "lowest_params": None, "seen": []}

    def closure():
        """The fit's loss and its gradients: every training batch (L-BFGS), or the next in turn (Adam)."""
        point = [v.detach().clone() for v in values]
        if optimizer == "lbfgs":
            for seen, loss, grads in state["seen"]:
                if all(torch.equal(a, b) for a, b in zip(seen, point)):
                    for p, g in zip(values, grads):
                        p.grad = g.clone()
                    return loss
        if state["step"] >= iterations:
            raise _Spent
        chosen = train if optimizer == "lbfgs" else [train[state["step"] % len(train)]]
        state["step"] += 1
        with torch.enable_grad():
            loss = sum((tuned_sample(field(fit_model, i), batches[i], sampler).double() - targets[i].double())
                       .flatten(1).pow(2).sum(1).mean() for i in chosen) / len(chosen)
            grads = torch.autograd.grad(loss, values)
        loss = loss.detach()
        for p, g in zip(values, grads):
            p.grad = g.clone()
        state["loss"] = loss.item()
        state["seen"] = [*state["seen"][-3:], (point, loss, grads)]
        if state["loss"] < state["lowest"]:
            state["lowest"], state["lowest_params"] = state["loss"], dict(zip(names, point))
        return loss

    checks_since_best, done, checked = 0, 0, None
    window = 1 if optimizer == "lbfgs" else 0  # evaluations at the last check (L-BFGS: the start's own first)
    bar = _bar(iterations, progress)
    while done < iterations and checks_since_best < patience:
        spent = False
        try:
            if optimizer == "lbfgs":
                opt.step(closure)
            else:
                for _ in range(eval_every):
                    opt.step(closure)
        except _Spent:  # `iterations` reached inside a line search: the last trial point is dropped
            spent = True
        moved, done = state["step"] > done, state["step"]
        if not all(torch.isfinite(v).all() for v in values):
            break  # a step went where the field or the grid is undefined; keep the best so far
        if moved and not spent and done - window < eval_every:
            continue  # a step cut short (L-BFGS's tolerances): check after eval_every evaluations, as planned
        window = done
        if optimizer == "lbfgs":
            candidate = state["lowest_params"]  # the accepted iterate, or a lower trial point of a cut-off search
        else:
            candidate = {k: v.detach().clone() for k, v in params.items()}
        if candidate is None or candidate is checked:
            if spent or not moved:
                break  # converged, or out of evaluations, with nothing new to check
            continue
        checked = candidate
        rms = held_out(candidate)
        if rms < best_rms:
            best_rms, checks_since_best, best = rms, 0, candidate
        else:
            checks_since_best += 1
        bar.set_postfix_str(f"fit {state['lowest'] ** 0.5:.3g} held-out {rms:.3g} (base {base_rms:.3g})")
        bar.update(min(done, iterations) - bar.n)
        if spent or not moved:
            break
    bar.close()
    accepted = best_rms < base_rms
    settings = {**start.settings, "heldout_rms": best_rms, "base_heldout_rms": base_rms, "accepted": accepted,
                "iterations": done, "fit_evaluations": fit[0], "reference_evaluations": solved[0],
                "heldout_evaluations": free[0], "other_evaluations": solved[0] + free[0],
                "seconds": time.perf_counter() - t0, "reference": reference,
                "cfg_scale": float(cfg_scale), "cfg_interval": [float(v) for v in cfg_interval]}
    return TunedSampler(best if accepted else {k: v.to(device) for k, v in start.params.items()}, settings)


class _Spent(Exception):
    """Raised by the fit's closure when a new evaluation would pass `iterations`."""


def _bar(total: int, enabled: bool):
    """tqdm if it is installed, else a bar that prints its last status line."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _PlainBar(enabled)
    return tqdm(total=total, desc="tune sampler", disable=not enabled, leave=False)


class _PlainBar:
    def __init__(self, enabled: bool):
        self.enabled, self.text, self.n = enabled, "", 0

    def set_postfix_str(self, text: str) -> None:
        self.text = text

    def update(self, n: int) -> None:
        self.n += n

    def close(self) -> None:
        if self.enabled and self.text:
            print(f"tune sampler: {self.text}")


# ------------------------------------------------------------------ files


def save_sampler(path: str, sampler: TunedSampler) -> None:
    """The params as tensors and each setting as a JSON metadata field of a .safetensors file."""
    from .models import save_safetensors

    save_safetensors(path, sampler.params, {k: json.dumps(v) for k, v in sampler.settings.items()})


def load_sampler(path: str) -> TunedSampler:
    """A sampler written by ``save_sampler``; ValueError naming the file if it is not one."""
    from .models import read_safetensors

    params, meta = read_safetensors(path)
    try:
        settings = {k: json.loads(v) for k, v in meta.items()}
        if settings.get("format") != FORMAT:
            raise ValueError(f"format {settings.get('format')!r}")
        return TunedSampler({k: v.double() for k, v in params.items()}, settings)
    except ValueError as e:
        raise ValueError(f"{path!r} is not a sit-ext sampler file ({e})") from None


def mismatches(sampler: TunedSampler, **used) -> list[str]:
    """What differs between the settings a sampler was fitted for and those it
    is used with (each named, as 'name: fitted X, used Y'); keys the sampler
    does not record are not compared."""
    out = []
    for name, value in used.items():
        if name in sampler.settings and sampler.settings[name] != value:
            out.append(f"{name}: fitted {sampler.settings[name]!r}, used {value!r}")
    return out


__all__ = ["TunedSampler", "endpoint_rms", "initial_sampler", "iterations_within", "load_sampler", "mismatches",
           "save_sampler", "solve_reference", "tune_sampler"]
