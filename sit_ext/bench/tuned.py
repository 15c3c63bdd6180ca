"""Tuned samplers against fixed ones (``sit-ext bench --samplers --tuned``).

- Mixture: the 8-mode mixture of ``samplers``, linear and cosine paths,
  velocity prediction. Per draw: fit an Adams-based sampler on one set of
  noise (two training batches and a held-out batch), score it on a disjoint
  set by the RMS distance to the exact flow (float64 dopri5, rtol 1e-10) from
  the same noise, beside every fixed sampler (Heun and Adams on each step
  schedule of ``samplers``) and uniform Heun at 50 evaluations.
- Digits (``--digits STEPS``): the digits demo's model trained as
  ``bench --samplers --digits`` trains it; tuned against fixed by the class
  accuracy and the Frechet distance of classifier features, over draws of the
  evaluation noise.
- Cost: tuning's model evaluations (rows; guidance runs two per sample) and
  seconds, beside training's (steps x batch). Each digits fit is sized to
  stay within BUDGET of training's rows, its reference solve included.

Writes <date>-<device>-samplers-tuned.json (-digits.json) into the output folder.
"""

from __future__ import annotations

import json
import math
import os
import time

import torch

from ..transport import Transport
from ..tuned import endpoint_rms, iterations_within, tune_sampler
from . import samplers as sb

NFES = (4, 6, 8, 10, 12, 16)
START = ("shift", 0.5)  # the tuned sampler starts from Adams on this grid (the best fixed setting on the mixture)
GOAL_NFE = {"linear": 10, "cosine": 8}  # uniform Heun@50's error reached with at most this many evaluations
FIT_SIZE, TEST_SIZE = 1024, 2000  # fit noise 1024 per batch: at 512 one cosine 8-NFE draw stayed above Heun@50


def _fixed(transport, model, z, method, schedule, nfe):
    steps = nfe // sb.EVALS_PER_STEP[method]
    return transport.sample_ode(model, z, method=method, num_steps=steps, schedule=schedule[0],
                                schedule_param=schedule[1])


def _stats(values: list[float]) -> dict:
    return {"mean": sb._mean(values), "std": sb._std(values), "draws": values}


def run_mixture(out_dir: str, draws: int = 3, nfes: list[int] | None = None, seed: int = 0,
                verbose: bool = True, fit_size: int = FIT_SIZE, test_size: int = TEST_SIZE) -> dict:
    start = time.perf_counter()
    say = print if verbose else (lambda *a, **k: None)
    nfes = sorted(nfes or NFES)
    mixture = sb.narrow_mixture()
    result = {"meta": {**sb._meta("cpu", test_size, nfes, False), "draws": draws, "fit_size": fit_size,
                       "start": list(START), "base": "adams"}, "paths": {}}
    for path in ("linear", "cosine"):
        transport = Transport(path, "velocity")
        model = mixture.model(transport.schedule)
        rows: dict = {"baseline": [], "fixed": {}, "tuned": {}, "start": {}, "fits": {}}
        for d in range(draws):
            gen = torch.Generator().manual_seed(seed * 1000 + d)
            fit_noise = [torch.randn(fit_size, 2, generator=gen) for _ in range(3)]
            test = torch.randn(test_size, 2, generator=gen)  # drawn after the fit's noise: disjoint
            exact = mixture.flow(transport.schedule, test, 1.0, 0.0, rtol=1e-10)
            rows["baseline"].append(endpoint_rms(_fixed(transport, model, test, "heun", ("uniform", None), 50),
                                                 exact))
            for nfe in nfes:
                for method in ("heun", "adams"):
                    for schedule in sb.SCHEDULES:
                        label = f"{method}/{sb._schedule_label(schedule)}"
                        x = _fixed(transport, model, test, method, schedule, nfe)
                        rows["fixed"].setdefault(label, {}).setdefault(str(nfe), []).append(endpoint_rms(x, exact))
                sampler = tune_sampler(transport, model, fit_noise, nfe, "adams", schedule=START[0],
                                       schedule_param=START[1], progress=False)
                x = transport.sample_ode(model, test, sampler=sampler)
                rows["tuned"].setdefault(str(nfe), []).append(endpoint_rms(x, exact))
                rows["start"].setdefault(str(nfe), []).append(
                    rows["fixed"][f"adams/{sb._schedule_label(START)}"][str(nfe)][-1])
                fit = {k: sampler.settings[k] for k in ("heldout_rms", "base_heldout_rms", "accepted", "iterations",
                                                        "fit_evaluations", "other_evaluations", "seconds")}
                rows["fits"].setdefault(str(nfe), []).append(fit)
                say(f"{path} draw {d} NFE {nfe}: tuned {rows['tuned'][str(nfe)][-1]:.4g}, start "
                    f"{rows['start'][str(nfe)][-1]:.4g}, Heun@50 {rows['baseline'][-1]:.4g} "
                    f"({fit['iterations']} fit evaluations, {fit['seconds']:.1f} s)")
        result["paths"][path] = _summary(rows, nfes, path)
        say(_format(path, result["paths"][path]))
    result["meta"]["seconds"] = time.perf_counter() - start
    _write(out_dir, "samplers-tuned", result, say)
    return result


def _summary(rows: dict, nfes: list[int], path: str) -> dict:
    baseline = _stats(rows["baseline"])
    table = []
    for nfe in nfes:
        key = str(nfe)
        fixed = {label: sb._mean(v[key]) for label, v in rows["fixed"].items()}
        best = min(fixed, key=fixed.get)
        tuned, start = rows["tuned"][key], rows["start"][key]
        table.append({"nfe": nfe, "tuned": _stats(tuned), "best_fixed": best,
                      "best_fixed_rms": _stats(rows["fixed"][best][key]), "start": _stats(start),
                      "tuned_never_worse_than_start": all(t <= s for t, s in zip(tuned, start)),
                      "fits": rows["fits"][key]})
    reach_tuned = sb._nfe_to_reach([{"nfe": r["nfe"], "rms_error": r["tuned"]["mean"]} for r in table],
                                   baseline["mean"])
    fixed_curves = {label: [{"nfe": n, "rms_error": sb._mean(v[str(n)])} for n in nfes]
                    for label, v in rows["fixed"].items()}
    reach_fixed = {label: sb._nfe_to_reach(curve, baseline["mean"]) for label, curve in fixed_curves.items()}
    goal = GOAL_NFE[path]
    return {"heun50_rms": baseline, "rows": table, "fixed": rows["fixed"], "nfe_to_reach_heun50_tuned": reach_tuned,
            "nfe_to_reach_heun50_fixed": reach_fixed, "goal_nfe": goal,
            "goal_met": reach_tuned["nfe"] is not None and reach_tuned["nfe"] <= goal,
            "never_worse_than_start": all(r["tuned_never_worse_than_start"] for r in table)}


def _format(path: str, s: dict) -> str:
    b = s["heun50_rms"]
    lines = [f"mixture, {path} path: uniform Heun@50 RMS {b['mean']:.4g} +- {b['std']:.2g}"]
    for r in s["rows"]:
        t, f = r["tuned"], r["best_fixed_rms"]
        lines.append(f"  NFE {r['nfe']:<3} tuned {t['mean']:.4g} +- {t['std']:.2g}   best fixed {r['best_fixed']:<16}"
                     f"{f['mean']:.4g} +- {f['std']:.2g}   ratio {t['mean'] / f['mean']:.3f}")
    reach = s["nfe_to_reach_heun50_tuned"]
    lines.append(f"  tuned reaches Heun@50 at NFE {reach['nfe']} (interpolated {reach['interpolated']}); goal <= "
                 f"{s['goal_nfe']}: {'met' if s['goal_met'] else 'missed'}; never worse than its start: "
                 f"{s['never_worse_than_start']}")
    return "\n".join(lines)


DIGITS_NFES = (4, 8, 16)
BUDGET = 0.01  # each digits fit, its own reference solve included, within this fraction of training's rows



def run_digits(out_dir: str, steps: int = 1500, nfes: list[int] | None = None, draws: int = 3,
               per_class: int = 20, cfg_scale: float = 2.0, seed: int = 0, verbose: bool = True,
               fit_batch: int = 8, held_out: int = 8, reference_steps: int = 32, eval_every: int = 5,
               budget: float = BUDGET) -> dict:
    """Trains the digits model as ``samplers.run_digits`` does, tunes an
    Adams sampler per NFE and scores tuned and Adams at each NFE, Heun at 8,
    against Heun@64 on `draws` fresh evaluation sets of per_class digits per
    class.

    The fits share one noise set (fit_batch fitted, held_out held out) and one
    reference solve of it (`reference_steps` Adams steps on the shift-0.5
    grid; its error is checked against 256 steps, outside the cost). Each fit
    gets the most L-BFGS evaluations that keep it, with a reference solve of
    its own, within `budget` of training's rows; the cost is reported so
    (per NFE) and with the one shared reference split over the NFEs
    (amortised)."""
    import tempfile

    from .. import data as data_lib
    from ..evaluate import frechet_distance
    from ..training import TrainConfig, train
    from ..tuned import solve_reference

    start = time.perf_counter()
    say = print if verbose else (lambda *a, **k: None)
    nfes = sorted(nfes or DIGITS_NFES)
    if reference_steps <= nfes[-1]:  # at reference_steps == NFE the start is the reference: nothing to fit
        raise ValueError(f"reference_steps ({reference_steps}) must exceed the largest NFE tuned ({nfes[-1]})")
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = TrainConfig.for_data("digits", steps=steps, seed=seed, out=run_dir, ckpt_every=steps, log_every=50,
                                   device="cpu")
        t_train = time.perf_counter()
        summary = train(cfg, progress=False, log=lambda *a: None)
        train_seconds = time.perf_counter() - t_train
    ema, transport = summary["ema"].eval(), summary["transport"]
    for p in ema.parameters():
        p.requires_grad_(False)
    x, y = data_lib.load_digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train_idx, test_idx = perm[:1500], perm[1500:]
    judge = data_lib.DigitClassifier(x[train_idx], y[train_idx])
    real = judge.features(x[test_idx])
    guidance = dict(cfg_scale=cfg_scale, null_label=10)
    train_rows = steps * cfg.batch_size
    per_sample = 2 if cfg_scale != 1.0 else 1  # guidance evaluates a conditional and an unconditional row
    result = {"meta": {**sb._meta("cpu", 10 * per_class, nfes, False), "train_steps": steps,
                       "train_batch": cfg.batch_size, "train_rows": train_rows,
                       "train_seconds": train_seconds, "cfg_scale": cfg_scale, "draws": draws,
                       "fit_batch": fit_batch, "held_out": held_out, "reference_steps": reference_steps,
                       "eval_every": eval_every, "budget": budget},
              "rows": [], "fits": []}
    gen = torch.Generator().manual_seed(seed + 7)
    fit_noise = [torch.randn(fit_batch, 1, 8, 8, generator=gen), torch.randn(held_out, 1, 8, 8, generator=gen)]
    fit_labels = [{"y": torch.arange(len(z)) % 10} for z in fit_noise]
    reference = {"method": "adams", "num_steps": reference_steps, "schedule": "shift", "schedule_param": 0.5}
    t_ref = time.perf_counter()
    endpoints = solve_reference(transport, ema, fit_noise, model_kwargs=fit_labels, reference=reference, **guidance)
    reference_rows = per_sample * (fit_batch + held_out) * reference_steps  # Adams: one evaluation a step
    reference_seconds = time.perf_counter() - t_ref
    finer = transport.sample_ode(ema, fit_noise[-1], model_kwargs=fit_labels[-1], method="adams", num_steps=256,
                                 schedule="shift", schedule_param=0.5, **guidance)
    result["reference"] = {**reference, "rows": reference_rows, "seconds": reference_seconds,
                           "heldout_rms_to_256_steps": endpoint_rms(endpoints[-1], finer)}
    say(f"digits reference: {reference_steps} Adams steps, {reference_rows} rows, "
        f"{result['reference']['heldout_rms_to_256_steps']:.3g} from 256 steps on the held-out batch")
    samplers = {}
    for nfe in nfes:
        iterations = iterations_within(budget * train_rows, nfe, per_sample * fit_batch, per_sample * held_out,
                                    reference_rows, eval_every)
        s = tune_sampler(transport, ema, fit_noise, nfe, "adams", schedule=START[0], schedule_param=START[1],
                         model_kwargs=fit_labels, progress=False, iterations=max(iterations, 1), eval_every=eval_every,
                         reference=reference, reference_endpoints=endpoints, **guidance)
        samplers[nfe] = s
        fit = {"nfe": nfe, "iterations_allowed": iterations,
               **{k: s.settings[k] for k in ("heldout_rms", "base_heldout_rms", "accepted", "iterations",
                                             "fit_evaluations", "heldout_evaluations", "seconds")}}
        own = fit["fit_evaluations"] + fit["heldout_evaluations"]
        fit["rows_fraction_of_training"] = (own + reference_rows) / train_rows  # with a reference of its own
        fit["rows_fraction_amortised"] = (own + reference_rows / len(nfes)) / train_rows  # one reference, all NFEs
        fit["within_budget"] = fit["rows_fraction_of_training"] <= budget  # a short smoke run cannot be
        result["fits"].append(fit)
        say(f"digits tune NFE {nfe}: held-out {fit['heldout_rms']:.4g} (start {fit['base_heldout_rms']:.4g}), "
            f"{fit['iterations']} evaluations, {fit['fit_evaluations']} fit + {fit['heldout_evaluations']} held-out "
            f"rows, {fit['seconds']:.0f} s: {100 * fit['rows_fraction_of_training']:.2f}% of training's rows with "
            f"its own reference, {100 * fit['rows_fraction_amortised']:.2f}% amortised")
    labels = torch.arange(10).repeat_interleave(per_class)
    settings = [("heun", ("uniform", None), 64), ("heun", ("uniform", None), 8)] + [
        (m, sch, n) for n in nfes for m, sch in (("adams", START), ("tuned", None))]
    scores: dict = {}
    for d in range(draws):
        z = torch.randn(len(labels), 1, 8, 8, generator=torch.Generator().manual_seed(seed + 100 + d))
        for method, schedule, nfe in settings:
            kwargs = dict(model_kwargs={"y": labels}, **guidance)
            if method == "tuned":
                samples = transport.sample_ode(ema, z, sampler=samplers[nfe], **kwargs)
                label = "tuned adams"
            else:
                samples = transport.sample_ode(ema, z, method=method, num_steps=nfe // sb.EVALS_PER_STEP[method],
                                               schedule=schedule[0], schedule_param=schedule[1], **kwargs)
                label = f"{method}/{sb._schedule_label(schedule)}"
            acc = judge.accuracy(samples.float(), labels)
            fd = frechet_distance(judge.features(samples.float()), real)
            entry = scores.setdefault((label, nfe), {"accuracy": [], "frechet": []})
            entry["accuracy"].append(acc)
            entry["frechet"].append(fd)
    for (label, nfe), v in scores.items():
        result["rows"].append({"sampler": label, "nfe": nfe, "accuracy": _stats(v["accuracy"]),
                               "frechet": _stats(v["frechet"])})
        say(f"digits {label:<16} NFE {nfe:<3} accuracy {sb._mean(v['accuracy']):.3f} +- {sb._std(v['accuracy']):.3f}"
            f"  Frechet {sb._mean(v['frechet']):.3f} +- {sb._std(v['frechet']):.3f}")
    ref = scores[("heun/uniform", 64)]["frechet"]
    goal = {}
    for label in ("tuned adams", "adams/shift 0.5", "heun/uniform"):
        if (label, 8) in scores:
            ratios = [a / b for a, b in zip(scores[(label, 8)]["frechet"], ref)]
            goal[label] = {"frechet_ratio_8_to_heun64": _stats(ratios), "within_2_percent": max(ratios) <= 1.02}
    result["goal_8nfe_frechet_within_2pct_of_heun64"] = goal
    result["meta"]["seconds"] = time.perf_counter() - start
    _write(out_dir, "samplers-tuned-digits", result, say)
    return result


def _write(out_dir: str, name: str, result: dict, say) -> None:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{time.strftime('%Y-%m-%d')}-cpu-{name}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v)
    say(f"# wrote {path} ({result['meta']['seconds']:.0f} s)")
