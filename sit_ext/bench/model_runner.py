"""The model matrix: times every model case (see model_cases), with the best
variants, TFLOP/s and MFU of each row, optional kernel profiles, the table and
the JSON after every row."""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence

import torch

from . import harness
from .harness import _allow_recompiles, _message, time_medians
from .model_cases import COMPARISONS, MODEL_MODES, MODEL_VARIANTS, _ModelRig, model_step_flops, peak_tflops
from .op_cases import AUTOCAST
from .profiling import format_profile, profile_kernels
from .report import _print, _write_json, machine_info


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_model_variants(builders: dict[str, Callable[[], Callable[[], object]]], device: torch.device,
                        **settings) -> dict[str, dict]:
    """{variant: {"ms"} or {"error"}}. Eager and compiled variants take turns
    (see time_medians); each graph variant is captured, timed and freed on its
    own, so that two graphs' memory never has to fit at once. A variant that
    fails (out of memory, say) is reported and the others go on."""
    report: dict[str, dict] = {}
    together: dict[str, Callable[[], object]] = {}
    for name, build in builders.items():
        if name.endswith("+graph"):
            continue
        try:
            fn = build()
            fn()
            together[name] = fn
        except Exception as e:  # reported in the row
            report[name] = {"error": _message(e)}
            _free(device)
    if together:
        report |= {name: {"ms": s * 1e3} for name, s in time_medians(together, device, **settings).items()}
    for name, build in builders.items():
        if not name.endswith("+graph"):
            continue
        try:
            fn = build()
            report[name] = {"ms": time_medians({name: fn}, device, **settings)[name] * 1e3}
        except Exception as e:
            report[name] = {"error": _message(e)}
        fn = None
        _free(device)
    return {name: report[name] for name in builders if name in report}


def summarize_model_row(row: dict, flops: float, peak: float | None) -> None:
    """Adds the best fused and unfused variants, x best unfused (its time over
    the best fused one's), the model TFLOP/s of the best fused variant and its
    MFU against `peak` TFLOP/s. The COMPARISONS (fused-nofold, fused-mlp,
    fused-batchadaln) are not candidates: the best fused variant is one of
    the defaults."""
    times = {v: row[v]["ms"] for v in MODEL_VARIANTS if "ms" in row.get(v, {})}
    fused = {v: ms for v, ms in times.items() if v.startswith("fused") and v not in COMPARISONS}
    unfused = {v: ms for v, ms in times.items() if v.startswith("unfused")}
    row["tflop"] = flops / 1e12
    for v, ms in times.items():
        row[v]["tflops"] = flops / (ms / 1e3) / 1e12
        if peak:
            row[v]["mfu"] = row[v]["tflops"] / peak
    if fused and unfused:
        row["best_fused"], row["best_unfused"] = min(fused, key=fused.get), min(unfused, key=unfused.get)
        row["x_best_unfused"] = unfused[row["best_unfused"]] / fused[row["best_fused"]]


def format_model_header() -> str:
    return (f"{'model':<10}{'mode':<20}{'batch':>6}{'dtype':>10}"
            + "".join(f"{v:>17}" for v in MODEL_VARIANTS)
            + f"{'x best unfused':>16}{'TFLOP/s':>9}{'MFU':>7}")


def format_model_row(row: dict) -> str:
    def cell(v):
        t = row.get(v)
        if not t:
            return f"{'-':>17}"
        return f"{t['ms']:>14.1f} ms" if "ms" in t else f"{'error':>17}"

    best = row.get(row.get("best_fused", ""), {})
    ratio = f"{row['x_best_unfused']:>16.2f}" if "x_best_unfused" in row else f"{'-':>16}"
    tflops = f"{best['tflops']:>9.3g}" if "tflops" in best else f"{'-':>9}"
    mfu = f"{100 * best['mfu']:>6.1f}%" if "mfu" in best else f"{'-':>7}"
    return (f"{row['model']:<10}{row['mode']:<20}{row['batch']:>6}{row['dtype']:>10}"
            + "".join(cell(v) for v in MODEL_VARIANTS) + ratio + tflops + mfu)


def run_models(device: str = "cpu", models: list[str] | None = None, batch: int | Sequence[int] | None = None,
               dtype: str | None = None, compile_: bool = True, out: str | None = None,
               log: Callable[[str], None] = _print, *, budget: float | None = None,
               profile: bool = False, peak: float | None = None, shapes: Sequence[tuple[str, int]] | None = None
               ) -> dict:
    """The model matrix: {fused, unfused} x {eager, torch.compile, CUDA graph}
    (graphs on CUDA only) for the train step and the guided sampling step, at
    each (model, batch) of `shapes` (default: every model in `models` at every
    batch in `batch`; on CUDA SiT-XL/2 at 32 and 256 and SiT-B/2 at 256). Each
    row has ms per variant, x best unfused (the best unfused variant's time
    over the best fused one's), the model TFLOP/s from an analytic FLOP count
    and MFU against `peak` TFLOP/s (default: the device's datasheet dense
    bf16 peak, see PEAK_TFLOPS). `profile` adds each variant's top kernels and
    GPU-busy share (kernel time over step time). JSON is written after every
    row; `budget` as in run()."""
    start = harness.now()
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA requested but no CUDA device is available")
    _allow_recompiles()
    cuda = dev.type == "cuda"
    if shapes is None and models is None and batch is None and cuda:
        shapes = [("SiT-XL/2", 32), ("SiT-XL/2", 256), ("SiT-B/2", 256)]
    if shapes is None:
        batches = [batch] if isinstance(batch, int) else list(batch or [32 if cuda else 2])
        shapes = [(m, b) for m in models or (["SiT-XL/2"] if cuda else ["SiT-S/2"]) for b in batches]
    dtype = "bfloat16" if dtype == AUTOCAST else dtype  # the model runs under autocast on CUDA anyway
    dtype_ = getattr(torch, dtype or ("bfloat16" if cuda else "float32"))
    peak = peak or peak_tflops(dev)
    total = len(shapes) * len(MODEL_MODES)
    result = {"meta": machine_info(dev), "budget_s": budget, "peak_tflops": peak, "planned": total,
              "skipped": 0, "results": []}
    log(f"# {result['meta'].get('device_name', result['meta']['cpu'])}, torch {torch.__version__}"
        + (f", peak {peak:g} TFLOP/s (dense bf16)" if peak else ", no MFU (no peak known: --peak-tflops)")
        + ("" if cuda else "; graph variants need CUDA"))
    log(format_model_header())
    done = 0
    rig, rig_name = None, None
    for name, b in shapes:
        if harness.budget_spent(start, budget):
            break
        if rig_name != name:
            rig = None
            _free(dev)
            rig, rig_name = _ModelRig(name, dev, dtype_, compile_), name
        for mode, builders in rig.cases(b):
            if harness.budget_spent(start, budget):
                break
            row = {"model": name, "mode": mode, "batch": b, "dtype": str(dtype_).removeprefix("torch.")}
            row |= time_model_variants(builders, dev, warmup=3, min_rounds=5, min_seconds=1.0)
            summarize_model_row(row, model_step_flops(rig.model, mode, b), peak)
            log(format_model_row(row))
            if profile and (cuda or mode == "train step"):
                row["profile"] = {}
                for variant in [v for v in builders if "ms" in row.get(v, {})] if cuda else ["fused", "unfused"]:
                    try:
                        row["profile"][variant] = profile_kernels(builders[variant](), dev)
                        if cuda:
                            busy = row["profile"][variant]["busy_ms_per_step"] / row[variant]["ms"]
                            row[variant]["busy_share"] = busy
                    except Exception as e:  # the timings stand without it
                        row["profile"][variant] = {"error": _message(e)}
                    _free(dev)
                    for line in format_profile(f"{name} {mode} batch {b} {variant}", row["profile"][variant]):
                        log(line)
            result["results"].append(row)
            done += 1
            _write_json(out, result)
    rig = None
    _free(dev)
    if done < total:
        result["skipped"] = total - done
        log(f"# budget of {budget:g} s spent after {harness.now() - start:.0f} s: "
            f"skipped {total - done} of {total} cases")
    result["seconds"] = harness.now() - start
    _write_json(out, result)
    if out:
        log(f"# wrote {out}")
    return result
