"""The op benchmark: times every op case (see harness and op_cases), prints
the table and writes the JSON after every row."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from . import harness
from .harness import _allow_recompiles, _copies, _footprint, copy_bandwidth, time_variants
from .op_cases import OP_FAMILIES, Case, _dtype_name, default_batches, default_dtypes, default_sizes, plan_cases
from .report import _print, _write_json, machine_info


def run_case(case: Case, device: torch.device, copy_gbs: float | None = None) -> dict:
    """Times one case (see time_variants) and returns its JSON row."""
    first = case.make()
    sets = [first] + [case.make() for _ in range(_copies(device, _footprint(first)) - 1)]
    calls = {name: [functools.partial(fn, **inputs) for inputs in sets] for name, fn in case.variants.items()}
    times = time_variants(calls, device, launch=("fused",) if device.type == "cuda" else ())
    row = {"op": case.op, "mode": case.mode, "size": case.size, "shape": list(case.shape), "dtype": case.dtype}
    if case.dtypes:
        row["dtypes"] = case.dtypes
    row |= {"bytes": case.bytes, "copies": len(sets)}
    for name, t in times.items():
        row[name] = {k: v for k, v in t.items() if k != "seconds"}
        if "seconds" in t:
            row[name] |= {"ms": t["seconds"] * 1e3, "gbs": case.bytes / t["seconds"] / 1e9}
    if device.type == "cuda" and "fused_launch" not in row and "ms" in row.get("fused", {}):
        row["fused_launch"] = dict(row["fused"])  # the fused op ran without a graph anyway
    for other in ("eager", "compiled"):
        both = "ms" in row.get("fused", {}) and "ms" in row.get(other, {})
        row[f"x_vs_{other}"] = row[other]["ms"] / row["fused"]["ms"] if both else float("nan")
    if copy_gbs and "gbs" in row.get("fused", {}):
        row["pct_of_copy"] = 100 * row["fused"]["gbs"] / copy_gbs
    del calls, sets, first
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the next shape may need the room
    return row


def format_header() -> str:
    return (f"{'op':<28}{'mode':<9}{'size':<6}{'shape':<18}{'dtype':<10}"
            f"{'fused ms':>10}{'eager ms':>10}{'compiled':>10}{'x eager':>9}{'x compile':>10}"
            f"{'GB/s':>8}{'% copy':>8}{'launch ms':>10}")


def format_row(row: dict) -> str:
    def ms(v):
        t = row.get(v)
        if not t:
            return f"{'-':>10}"
        if "ms" not in t:
            return f"{'error':>10}"
        return f"{t['ms']:>9.3f}{'*' if t.get('timing') == 'events' and v != 'fused_launch' else ' '}"

    def ratio(key, width):  # a variant that did not run (no torch.compile) shows a dash, not nan
        value = row.get(key, float("nan"))
        return f"{'—':>{width}}" if math.isnan(value) else f"{value:>{width}.2f}"

    pct = f"{row['pct_of_copy']:>8.1f}" if "pct_of_copy" in row else f"{'-':>8}"
    gbs = f"{row['fused']['gbs']:>8.1f}" if "gbs" in row.get("fused", {}) else f"{'-':>8}"
    shape = "x".join(str(s) for s in row["shape"])
    return (f"{row['op']:<28}{row['mode']:<9}{row['size']:<6}{shape:<18}{row['dtype']:<10}"
            f"{ms('fused')}{ms('eager')}{ms('compiled')}"
            f"{ratio('x_vs_eager', 9)}{ratio('x_vs_compiled', 10)}"
            f"{gbs}{pct}{ms('fused_launch')}")


def run(ops_: list[str], device: str = "cpu", dtypes: list[str] | None = None,
        batches: list[int] | None = None, quick: bool = False, out: str | None = None,
        log: Callable[[str], None] = _print, *, budget: float | None = None, compile_: bool = True) -> dict:
    """Runs the op benchmarks and writes JSON to `out` (when given) after every
    row. With a `budget` in seconds (from this call), no case starts once it is
    spent; result["skipped"] counts the cases left out."""
    start = harness.now()
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA requested but no CUDA device is available")
    unknown = set(ops_) - set(OP_FAMILIES)
    if unknown:
        raise SystemExit(f"unknown op(s) {sorted(unknown)}: choose from {sorted(OP_FAMILIES)}")
    dtypes = [_dtype_name(d) for d in dtypes or default_dtypes(dev)]
    batches = batches or default_batches(dev, quick)

    _allow_recompiles()
    cases = plan_cases(ops_, dev, dtypes, default_sizes(dev, quick), batches, compile_)
    unsupported = {}
    for case in cases:
        if case.skip and (case.op, case.dtype) not in unsupported:
            unsupported[(case.op, case.dtype)] = case.skip
            log(f"# {case.op} {case.dtype}: skipped, the installed fused op cannot run it ({case.skip})")
    cases = [c for c in cases if not c.skip]
    copy_gbs = copy_bandwidth(dev) if dev.type == "cuda" else None
    result = {"meta": machine_info(dev), "copy_bandwidth_gbs": copy_gbs, "budget_s": budget,
              "planned": len(cases), "skipped": 0,
              "unsupported": [{"op": op, "dtype": dt, "why": why} for (op, dt), why in unsupported.items()],
              "results": []}
    log(f"# {result['meta'].get('device_name', result['meta']['cpu'])}, torch {torch.__version__}"
        + (f", copy bandwidth {copy_gbs:.0f} GB/s" if copy_gbs else "") + f", {len(cases)} cases"
        + (f", budget {budget:g} s" if budget is not None else ""))
    if dev.type == "cuda":
        log("# GPU time per call from CUDA graph replays; * = events around eager calls (no graph); "
            "launch ms = the fused op launched eagerly")
    log(format_header())
    for i, case in enumerate(cases):
        if harness.budget_spent(start, budget):
            result["skipped"] = len(cases) - i
            log(f"# budget of {budget:g} s spent after {harness.now() - start:.0f} s: "
                f"skipped {result['skipped']} of {len(cases)} cases")
            break
        row = run_case(case, dev, copy_gbs)
        result["results"].append(row)
        log(format_row(row))
        _write_json(out, result)
    result["seconds"] = harness.now() - start
    _write_json(out, result)
    if out:
        log(f"# wrote {out}")
    return result
