"""Samplers against exact answers: error against model evaluations (NFE).

The models return the exact field of known data, so every error is the
sampler's own:

- "gaussian": N(1, 0.1^2) in one dimension, stiff at the data end; its flow is affine;
- "mixture": 8 Gaussians of std 0.1 on a circle of radius 2.5 in 2-D, whose
  velocity, noise and score are posterior mixtures of the components' fields.

Every run uses the linear path and velocity prediction (SiT's default).

- ODE: the per-sample RMS distance to the exact flow from the same noise (closed
  form for the Gaussian; for the mixture a float64 dopri5 solve at rtol 1e-10).
  With 20k samples a distance between distributions would measure the draw more
  than the sampler.
- SDE: on the Gaussian, the errors of the sample mean and variance in standard
  errors (z); on the mixture, sliced W1 to 100k exact samples, beside the spread
  of fresh exact draws of the same size.

Each sampler x step schedule x NFE runs once, the official-equivalent settings
(uniform Euler and Heun; uniform Euler-Maruyama with the "Mean" last step) among
them. Writes <date>-<device>-samplers.json and .png into the output folder.

    python bench/samplers.py [--quick]      # or: sit-ext bench --samplers
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from collections.abc import Callable

import torch

from ..transport import Transport
from .exact import SlicedW1, narrow_mixture, rms_distance, stiff_gaussian, z_scores

NFES = (4, 8, 16, 32, 64, 128, 250)
QUICK_NFES = (4, 16)
ODE_METHODS = ("euler", "heun", "adams")
SDE_METHODS = ("euler", "heun")
# (schedule, schedule_param): shift 3 is the flow models' default, toward the noise end; 0.5 leans to the data end.
SCHEDULES = (("uniform", None), ("shift", 3.0), ("shift", 0.5), ("power", 2.0), ("power", 3.0))
EVALS_PER_STEP = {"euler": 1, "heun": 2, "adams": 1}
DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")
BASELINE_NFE = 50  # the goal: uniform Heun's error at 50 NFE on the mixture ...
GOAL_NFE = 16  # ... reached with at most 16
SDE_GOAL_NFE, SDE_GOAL_Z = 128, 5.0  # the stiff Gaussian within 5 standard errors at <= 128 NFE
# The stiff end, every diffusion form: the official default, the same without its last step, and the fix.
STIFF_END = (("euler", ("uniform", None), "Mean", 250), ("euler", ("uniform", None), None, 250),
             ("euler", ("power", 3.0), None, SDE_GOAL_NFE))


# ------------------------------------------------------------------ runs


def _counted(model: Callable) -> tuple[Callable, list[int]]:
    calls = [0]

    def counted(x, t):
        calls[0] += 1
        return model(x, t)

    return counted, calls


def _ode(transport, model, z, method, schedule, nfe):
    counted, calls = _counted(model)
    x = transport.sample_ode(counted, z, method=method, num_steps=max(nfe // EVALS_PER_STEP[method], 1),
                             schedule=schedule[0], schedule_param=schedule[1])
    return x, calls[0]


def _sde(transport, model, z, method, schedule, nfe, seed, form="sigma", last_step=None):
    """last_step=None: the SDE down to t_lo; "Mean" (the official default) spends one evaluation on it."""
    counted, calls = _counted(model)
    steps = max(nfe // EVALS_PER_STEP[method], 1) + (last_step is None)
    x = transport.sample_sde(counted, z, method=method, num_steps=max(steps, 2), schedule=schedule[0],
                             schedule_param=schedule[1], diffusion_form=form, last_step=last_step,
                             generator=torch.Generator(z.device).manual_seed(seed))
    return x, calls[0]


def _schedule_label(schedule: tuple) -> str:
    return schedule[0] if schedule[1] is None else f"{schedule[0]} {schedule[1]:g}"


def _label(row: dict) -> str:
    last = f" +{row['last_step']}" if row.get("last_step") else ""
    return f"{row['method']}/{row['schedule']}{last}"


def _official(row: dict, kind: str) -> bool:
    """The official samplers' settings: uniform Euler and Heun; uniform Euler-Maruyama with its "Mean" last step."""
    if kind == "ode":
        return row["schedule"] == "uniform" and row["method"] in ("euler", "heun")
    return row["schedule"] == "uniform" and row["method"] == "euler" and row.get("last_step") == "Mean"


def run(out_dir: str, quick: bool = False, device: str = "cpu", samples: int | None = None,
        nfe: list[int] | None = None, seed: int = 0, verbose: bool = True) -> dict:
    """Runs the benchmark, writes <date>-<device>-samplers.json and .png into
    out_dir and returns the result. quick: 1000 samples, NFE 4 and 16 and looser
    references (seconds, for tests)."""
    start = time.perf_counter()
    n = samples or (1000 if quick else 20_000)
    nfes = sorted(nfe or (QUICK_NFES if quick else NFES))
    _check_sizes(samples=n, nfe=nfes)
    say = print if verbose else (lambda *a, **k: None)
    transport = Transport("linear", "velocity")
    datas = {"gaussian": stiff_gaussian(), "mixture": narrow_mixture()}
    models = {name: data.model(transport.schedule) for name, data in datas.items()}
    gen = torch.Generator().manual_seed(seed)
    noises = {name: torch.randn(n, data.dim, generator=gen).to(device) for name, data in datas.items()}
    result = {"meta": _meta(device, n, nfes, quick), "ode": [], "sde": [], "stiff_end": []}

    # ODE: per-sample distance to the exact flow from the same noise.
    lo, hi = transport.interval(sample=True)
    for name, data in datas.items():
        z = noises[name]
        exact = data.flow(transport.schedule, z, hi, lo, rtol=1e-5 if quick else 1e-10)
        for method in ODE_METHODS:
            for schedule in SCHEDULES:
                rows = []
                for target in nfes:
                    x, used = _ode(transport, models[name], z, method, schedule, target)
                    rows.append({"data": name, "method": method, "schedule": _schedule_label(schedule), "nfe": used,
                                 "rms_error": rms_distance(x, exact)})
                result["ode"] += rows
                say(_format_row(f"ode {name} {_label(rows[0])}", rows, "rms_error"))
        if name == "mixture":
            x, used = _ode(transport, models[name], z, "heun", ("uniform", None), BASELINE_NFE)
            result["baseline"] = {"data": name, "method": "heun", "schedule": "uniform", "nfe": used,
                                  "rms_error": rms_distance(x, exact)}

    # SDE: z-scores on the Gaussian, sliced W1 on the mixture.
    mixture = datas["mixture"]
    sliced = SlicedW1(mixture.sample(n * (2 if quick else 5), torch.Generator().manual_seed(seed + 1)), n)
    fresh = [sliced(mixture.sample(n, torch.Generator().manual_seed(seed + 2 + i))) for i in range(5)]
    result["fresh_draws_sliced_w1"] = {"mean": _mean(fresh), "std": _std(fresh), "draws": fresh}
    say(f"sde mixture: sliced W1 of fresh exact draws {_mean(fresh):.4f} +- {_std(fresh):.4f}")
    settings = [(m, s, None) for m in SDE_METHODS for s in SCHEDULES] + [("euler", ("uniform", None), "Mean")]
    for name in datas:
        for method, schedule, last_step in settings:
            rows = []
            for target in nfes:
                x, used = _sde(transport, models[name], noises[name], method, schedule, target, seed + 100,
                               last_step=last_step)
                row = {"data": name, "method": method, "schedule": _schedule_label(schedule), "last_step": last_step,
                       "form": "sigma", "nfe": used}
                if name == "gaussian":
                    row["z_mean"], row["z_var"] = z_scores(x, 1.0, 0.1)
                else:
                    row["sliced_w1"] = sliced(x)
                rows.append(row)
            result["sde"] += rows
            say(_format_row(f"sde {name} {_label(rows[0])}", rows, "z_var" if name == "gaussian" else "sliced_w1"))

    # The stiff end, every diffusion form.
    for form in DIFFUSION_FORMS:
        for method, schedule, last_step, target in STIFF_END:
            x, used = _sde(transport, models["gaussian"], noises["gaussian"], method, schedule,
                           min(target, max(nfes)), seed + 100, form=form, last_step=last_step)
            z_mean, z_var = z_scores(x, 1.0, 0.1)
            result["stiff_end"].append({"form": form, "method": method, "schedule": _schedule_label(schedule),
                                        "last_step": last_step, "nfe": used, "z_mean": z_mean, "z_var": z_var})
    say(_format_stiff_end(result["stiff_end"]))

    result["goals"] = _goals(result)
    say(_format_goals(result["goals"]))
    result["meta"]["seconds"] = time.perf_counter() - start
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{time.strftime('%Y-%m-%d')}-{_device_slug(device)}-samplers")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    plot(result, stem + ".png")
    say(f"# wrote {stem}.json and {stem}.png ({result['meta']['seconds']:.0f} s)")
    return result


# The trained-model check: the digits demo's model, the baseline and the best new ODE setting of the mixture.
DIGITS_SETTINGS = (("heun", ("uniform", None)), ("adams", ("shift", 0.5)))
DIGITS_NFES = (4, 8, 16, 32, 64)


def _check_sizes(samples: int | None = None, nfe: list[int] | None = None, steps: int | None = None) -> None:
    """ValueError naming the flag: fewer than 2 samples (a spread needs 2), an
    NFE below 2 (Heun's least), a digits run of no steps."""
    if samples is not None and samples < 2:
        raise ValueError(f"--samples must be >= 2, got {samples}")
    if nfe is not None and min(nfe) < 2:
        raise ValueError(f"--nfe must be >= 2 (Heun takes 2 evaluations a step), got {min(nfe)}")
    if steps is not None and steps < 1:
        raise ValueError(f"--digits STEPS must be >= 1, got {steps}")


def run_digits(out_dir: str, steps: int = 1500, device: str = "cpu", nfe: list[int] | None = None,
               per_class: int = 50, cfg_scale: float = 2.0, seed: int = 0, verbose: bool = True) -> dict:
    """The same on a trained model: trains the digits demo's SiT for `steps`
    steps, samples per_class digits of each class with guidance for each
    setting of DIGITS_SETTINGS and NFE, and scores them as the demo does (a
    classifier trained on real digits: the requested class's accuracy, and the
    Frechet distance of its features to held-out digits). Writes
    <date>-<device>-samplers-digits.json into out_dir."""
    _check_sizes(nfe=nfe, steps=steps)
    import tempfile

    from .. import data as data_lib
    from ..evaluate import frechet_distance
    from ..training import TrainConfig, train

    start = time.perf_counter()
    say = print if verbose else (lambda *a, **k: None)
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = TrainConfig.for_data("digits", steps=steps, seed=seed, out=run_dir, ckpt_every=steps, log_every=50,
                                   device=device)
        summary = train(cfg, progress=False)
    ema, transport = summary["ema"].eval(), summary["transport"]
    x, y = data_lib.load_digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train_idx, test_idx = perm[:1500], perm[1500:]
    judge = data_lib.DigitClassifier(x[train_idx], y[train_idx])
    real = judge.features(x[test_idx])
    labels = torch.arange(10, device=device).repeat_interleave(per_class)
    z = torch.randn(len(labels), 1, 8, 8, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    floor = frechet_distance(judge.features(x[train_idx[: len(labels)]]), real)
    result = {"meta": {**_meta(device, len(labels), sorted(nfe or DIGITS_NFES), False), "train_steps": steps,
                       "cfg_scale": cfg_scale, "final_loss": summary["loss"]},
              "real_accuracy": judge.accuracy(x[test_idx], y[test_idx]), "frechet_floor": floor, "rows": []}
    for method, schedule in DIGITS_SETTINGS:
        for target in sorted(nfe or DIGITS_NFES):
            calls = [0]

            def counted(x_t, t, y=None, calls=calls):
                calls[0] += 1
                return ema(x_t, t, y)

            samples = transport.sample_ode(counted, z, method=method,
                                           num_steps=max(target // EVALS_PER_STEP[method], 1),
                                           schedule=schedule[0], schedule_param=schedule[1],
                                           model_kwargs={"y": labels}, cfg_scale=cfg_scale, null_label=10)
            row = {"method": method, "schedule": _schedule_label(schedule), "nfe": calls[0],
                   "accuracy": judge.accuracy(samples.float().cpu(), labels),
                   "frechet": frechet_distance(judge.features(samples.float().cpu()), real)}
            result["rows"].append(row)
            say(f"digits {method} {row['schedule']:<10} NFE {row['nfe']:<3} accuracy {row['accuracy']:.3f} "
                f"Frechet {row['frechet']:.2f} (real digits: {floor:.2f})")
    result["meta"]["seconds"] = time.perf_counter() - start
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{time.strftime('%Y-%m-%d')}-{_device_slug(device)}-samplers-digits.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    say(f"# wrote {path} ({result['meta']['seconds']:.0f} s)")
    return result


def _nfe_to_reach(rows: list[dict], target: float) -> dict:
    """The first NFE of the sweep at or below target, and an estimate between
    sweep points by log-log interpolation (None where never reached)."""
    rows = sorted(rows, key=lambda r: r["nfe"])
    for prev, row in zip([None, *rows[:-1]], rows):
        if row["rms_error"] <= target:
            if prev is None:
                return {"nfe": row["nfe"], "interpolated": float(row["nfe"])}
            slope = math.log(row["rms_error"] / prev["rms_error"]) / math.log(row["nfe"] / prev["nfe"])
            estimate = prev["nfe"] * math.exp(math.log(target / prev["rms_error"]) / slope)
            return {"nfe": row["nfe"], "interpolated": estimate}
    return {"nfe": None, "interpolated": None}


def _goals(result: dict) -> dict:
    """NFE each ODE setting needs to reach uniform Heun@50's error on the mixture;
    each SDE setting's z-scores on the stiff Gaussian at the largest NFE <= 128."""
    target = result["baseline"]["rms_error"]
    groups: dict[str, list[dict]] = {}
    for row in result["ode"]:
        if row["data"] == "mixture":
            groups.setdefault(_label(row), []).append(row)
    needed = {label: _nfe_to_reach(rows, target) for label, rows in groups.items()}
    new = [label for label, rows in groups.items() if not _official(rows[0], "ode")]
    sde = {}
    for row in result["sde"]:
        if row["data"] == "gaussian" and row["nfe"] <= SDE_GOAL_NFE:
            key = _label(row)
            if key not in sde or row["nfe"] > sde[key]["nfe"]:
                sde[key] = {"nfe": row["nfe"], "z_mean": row["z_mean"], "z_var": row["z_var"],
                            "worst": max(abs(row["z_mean"]), abs(row["z_var"]))}
    best_ode = min((label for label in new if needed[label]["interpolated"]),
                   key=lambda label: needed[label]["interpolated"], default=None)
    best_sde = min(sde, key=lambda k: sde[k]["worst"], default=None)
    return {"baseline_rms_error": target, "nfe_to_reach_baseline": needed, "best_ode": best_ode,
            "ode_goal_met": best_ode is not None and needed[best_ode]["interpolated"] <= GOAL_NFE,
            "sde_at_goal_nfe": sde, "best_sde": best_sde,
            "sde_goal_met": best_sde is not None and sde[best_sde]["worst"] <= SDE_GOAL_Z}


# ------------------------------------------------------------------ output


def _mean(v):
    return sum(v) / len(v)


def _std(v):
    m = _mean(v)
    return math.sqrt(sum((x - m) ** 2 for x in v) / max(len(v) - 1, 1))


def _format_row(label: str, rows: list[dict], key: str) -> str:
    return f"{label:<36}" + "  ".join(f"{r['nfe']}:{r[key]:.3g}" for r in rows)


def _format_stiff_end(rows: list[dict]) -> str:
    lines = ["stiff Gaussian, every diffusion form (z of mean, z of variance):"]
    for r in rows:
        lines.append(f"  {r['form']:<22}{_label(r):<26}NFE {r['nfe']:<4} {r['z_mean']:+8.1f} {r['z_var']:+8.1f}")
    return "\n".join(lines)


def _format_goals(goals: dict) -> str:
    needed = goals["nfe_to_reach_baseline"]
    reached = sorted((k for k in needed if needed[k]["interpolated"]), key=lambda k: needed[k]["interpolated"])
    lines = [f"mixture ODE: uniform Heun@{BASELINE_NFE} RMS error {goals['baseline_rms_error']:.3g}; NFE to reach it "
             "(interpolated): " + ", ".join(f"{k} {needed[k]['interpolated']:.0f}" for k in reached),
             f"  goal (a new setting at <= {GOAL_NFE} NFE): {'met' if goals['ode_goal_met'] else 'missed'}"]
    best = goals["best_sde"]
    if best:
        b = goals["sde_at_goal_nfe"][best]
        lines.append(f"stiff Gaussian SDE: best {best} at {b['nfe']} NFE, z mean {b['z_mean']:+.1f}, "
                     f"z var {b['z_var']:+.1f}; goal (|z| <= {SDE_GOAL_Z:g}): "
                     f"{'met' if goals['sde_goal_met'] else 'missed'}")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    """Error against NFE: ODE distance to the exact flow (both data), SDE sliced W1
    (mixture) and |z| of the variance (Gaussian); colour = method, line = schedule,
    thick = the official settings."""
    from ..plots import _pyplot, _save

    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(13, 10))
    colours = {"euler": "tab:blue", "heun": "tab:orange", "adams": "tab:green"}
    styles = dict(zip([_schedule_label(s) for s in SCHEDULES], ["-", (0, (1, 1)), ":", "--", "-."]))
    panels = [(axes[0, 0], "ode", "mixture", "rms_error", "ODE, mixture: RMS distance to the exact flow"),
              (axes[0, 1], "ode", "gaussian", "rms_error", "ODE, stiff Gaussian: RMS distance to the exact flow"),
              (axes[1, 0], "sde", "mixture", "sliced_w1", "SDE (sigma), mixture: sliced W1 to exact samples"),
              (axes[1, 1], "sde", "gaussian", "z_var", "SDE (sigma), stiff Gaussian: |z| of the variance")]
    for ax, kind, data, key, title in panels:
        groups: dict[str, list[dict]] = {}
        for row in result[kind]:
            if row["data"] == data:
                groups.setdefault(_label(row), []).append(row)
        for label, rows in groups.items():
            official = _official(rows[0], kind)
            ax.plot([r["nfe"] for r in rows], [max(abs(r[key]), 1e-12) for r in rows],
                    linestyle=styles[rows[0]["schedule"]], color=colours[rows[0]["method"]], marker="o",
                    markersize=2.5, linewidth=2.8 if official else 1.2,
                    label=label + (" (official)" if official else ""))
        if kind == "ode" and data == "mixture":
            ax.axhline(result["baseline"]["rms_error"], color="grey", linewidth=0.8,
                       label=f"uniform Heun @{BASELINE_NFE}")
        if key == "sliced_w1":
            fresh = result["fresh_draws_sliced_w1"]
            ax.axhspan(fresh["mean"] - fresh["std"], fresh["mean"] + fresh["std"], color="grey", alpha=0.3,
                       label="fresh exact draws (mean +- std)")
        if key == "z_var":
            ax.axhline(SDE_GOAL_Z, color="grey", linewidth=0.8, label=f"{SDE_GOAL_Z:g} standard errors")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("model evaluations (NFE)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"sit_ext samplers on exact fields ({result['meta']['samples']} samples, "
                 f"{result['meta']['machine']})", fontsize=10)
    _save(plt, fig, path)


def _device_slug(device: str) -> str:
    if not device.startswith("cuda"):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def _meta(device: str, n: int, nfes: list[int], quick: bool) -> dict:
    from .report import _cpu_name

    machine = torch.cuda.get_device_name(device) if device.startswith("cuda") else (
        f"{_cpu_name()}, {torch.get_num_threads()} threads")
    return {"machine": machine, "device": device, "torch": torch.__version__, "samples": n, "nfe": nfes,
            "quick": quick, "path": "linear", "prediction": "velocity", "sde_form": "sigma",
            "gaussian": "N(1, 0.1^2), 1-D", "mixture": "8 x N(2.5 (cos, sin)(k pi / 4), 0.1^2 I), 2-D",
            "schedules": [list(s) for s in SCHEDULES]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's own options (the caller adds --out, --quick and --device)."""
    parser.add_argument("--samples", type=int, help="samples per run (default 20000; 1000 with --quick)")
    parser.add_argument("--nfe", type=int, nargs="+", help=f"model evaluations (default {' '.join(map(str, NFES))})")
    parser.add_argument("--seed", type=int, help="(default: 0)")
    parser.add_argument("--digits", type=int, metavar="STEPS",
                        help="instead: train the digits demo's model for STEPS steps (1500: ~8 min on 2 CPU cores) "
                             "and score the baseline and the best new ODE setting on it against NFE")
    parser.add_argument("--tuned", action="store_true",
                        help="tuned samplers (sit_ext.tuned) against fixed ones, 3 draws: the mixture on the linear "
                             "and cosine paths, or with --digits STEPS the digits model (see sit_ext.bench.tuned)")


def run_tuned(args) -> None:
    """--tuned: the mixture, or the digits model with --digits STEPS (sit_ext.bench.tuned)."""
    from . import tuned as tuned_bench

    if args.device != "cpu":
        raise ValueError("--tuned runs on the CPU: pass --device cpu")
    _check_sizes(nfe=args.nfe, steps=args.digits)
    seed = args.seed or 0
    if args.digits:
        tuned_bench.run_digits(args.out, steps=args.digits, nfes=args.nfe, seed=seed)
    else:
        tuned_bench.run_mixture(args.out, nfes=args.nfe, seed=seed)


def main(argv: list[str] | None = None, out: str = "bench-results") -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=out, help="folder for the JSON and PNG")
    parser.add_argument("--quick", action="store_true", help="1000 samples, NFE 4 and 16: a smoke run")
    parser.add_argument("--device", default="cpu")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.tuned:
        run_tuned(args)
    elif args.digits:
        run_digits(args.out, steps=args.digits, device=args.device, nfe=args.nfe, seed=args.seed or 0)
    else:
        run(args.out, quick=args.quick, device=args.device, samples=args.samples, nfe=args.nfe, seed=args.seed or 0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
