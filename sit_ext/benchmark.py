"""Benchmarks: each fused op against its eager reference and against
torch.compile(reference, dynamic=False), forward and forward + backward.

Timing takes the median after a warm-up: CUDA events on a GPU (inputs rotated
so that the L2 cache does not serve them), perf_counter on the CPU. Bandwidth
is counted against the bytes that must move: each input read once and each
output written once. Run it through `python bench/run.py` or `sit-ext bench`.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import ops
from . import reference as ref
from ._build import build_info

# (name, D) of the SiT sizes; T = 256 tokens (SiT-*/2 at 256x256).
SIT_SIZES = [("S", 384), ("B", 768), ("XL", 1152)]
TOKENS = 256
VARIANTS = ("fused", "eager", "compiled")


@dataclass
class Case:
    """One op at one size: `run[variant]()` executes it once."""

    op: str
    mode: str  # "fwd" or "fwd+bwd"
    size: str
    shape: tuple
    dtype: torch.dtype
    bytes: int
    run: dict[str, Callable[[], object]] = field(default_factory=dict)


# ------------------------------------------------------------------- timing

# glibc returns large freed blocks to the OS, and the next allocation of the
# same size page-faults them back in: on a VM that cost swamps a memory-bound
# op and varies from call to call. These settings keep freed memory (up to 32
# MiB a block) in the process, for every variant alike.
_STABLE_MALLOC = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296"


def reexec_with_stable_allocator() -> None:
    """Restarts this process with _STABLE_MALLOC set (Linux with glibc only)."""
    if (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
            and "GLIBC_TUNABLES" not in os.environ):
        os.execve(sys.executable, list(sys.orig_argv), dict(os.environ, GLIBC_TUNABLES=_STABLE_MALLOC))



def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_medians(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int = 3,
                 min_rounds: int = 7, min_seconds: float = 0.5) -> dict[str, float]:
    """Median seconds per call of each fn, after `warmup` calls of each. The
    variants take turns, round by round, so that a slow spell of a noisy
    machine hits them all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (time.perf_counter() - start < min_seconds and rounds < 500):
        for name, fn in fns.items():
            samples[name].append(_time_once(fn, device))
        rounds += 1
    return {name: statistics.median(v) for name, v in samples.items()}


def copy_bandwidth(device: torch.device) -> float:
    """Device copy bandwidth in GB/s: a large copy, counting bytes read + written."""
    n = (1 << 28) if device.type == "cuda" else (1 << 25)  # 1 GiB / 128 MiB of fp32
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    seconds = time_medians({"copy": lambda: dst.copy_(src)}, device)["copy"]
    return 2 * src.numel() * src.element_size() / seconds / 1e9


class _Rotation:
    """Cycles through copies of the inputs, so that on a GPU each call reads
    memory that the previous calls did not leave in the L2 cache."""

    def __init__(self, make: Callable[[], dict], copies: int):
        self.sets = [make() for _ in range(copies)]
        self.i = 0

    def next(self) -> dict:
        self.i = (self.i + 1) % len(self.sets)
        return self.sets[self.i]


def _copies(device: torch.device, footprint: int) -> int:
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return max(1, min(8, math.ceil(4 * l2 / max(footprint, 1))))


def _case(op, mode, size, shape, dtype, device, bytes_, make, variants, footprint) -> Case:
    rotation = _Rotation(make, _copies(device, footprint))
    case = Case(op, mode, size, shape, dtype, bytes_)
    for name, fn in variants.items():
        case.run[name] = (lambda fn=fn: fn(**rotation.next()))
    return case


def _grad(outputs, inputs, grads=None):
    return torch.autograd.grad(outputs, inputs, grads)


# ---------------------------------------------------------------- op cases


def _impls(fused, reference) -> dict[str, Callable]:
    return {"fused": fused, "eager": reference, "compiled": torch.compile(reference, dynamic=False)}


def _allow_recompiles() -> None:
    """Every size is compiled for its own shapes (dynamic=False); without this,
    dynamo falls back to eager after 8 shapes per function and the "compiled"
    column would silently time eager code."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, 1024)
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, 4096)


def _variants(impls: dict[str, Callable], body: Callable) -> dict[str, Callable]:
    """{variant: fn(**inputs)} that runs body(implementation, **inputs)."""
    return {name: functools.partial(body, impl) for name, impl in impls.items()}


def interpolant_cases(shape, dtype, device, size) -> list[Case]:
    """x_t and u_t of the linear path; backward to x and noise."""
    n = math.prod(shape)
    es = torch.tensor([], dtype=dtype).element_size()

    def make(grad):
        return dict(x=torch.randn(shape, dtype=dtype, device=device, requires_grad=grad),
                    noise=torch.randn(shape, dtype=dtype, device=device, requires_grad=grad),
                    t=torch.rand(shape[0], device=device),
                    g=torch.randn(shape, dtype=dtype, device=device) if grad else None)

    def fwd(f, x, noise, t, g):
        return f(x, noise, t, "linear")

    def bwd(f, x, noise, t, g):
        return _grad(f(x, noise, t, "linear"), [x, noise], [g, g])

    impls = _impls(ops.interpolant, ref.interpolant)
    return [
        _case("interpolant", "fwd", size, shape, dtype, device, 4 * n * es, lambda: make(False),
              _variants(impls, fwd), 4 * n * es),
        # forward 4n, backward reads 2 grads, writes dx, dnoise
        _case("interpolant", "fwd+bwd", size, shape, dtype, device, 8 * n * es, lambda: make(True),
              _variants(impls, bwd), 5 * n * es),
    ]


def velocity_mse_cases(shape, dtype, device, size) -> list[Case]:
    """Per-sample velocity MSE with the target computed inside; backward to pred."""
    n = math.prod(shape)
    es = torch.tensor([], dtype=dtype).element_size()

    def make():
        return dict(pred=torch.randn(shape, dtype=dtype, device=device, requires_grad=True),
                    x=torch.randn(shape, dtype=dtype, device=device),
                    noise=torch.randn(shape, dtype=dtype, device=device),
                    t=torch.rand(shape[0], device=device))

    def fwd(f, pred, x, noise, t):
        return f(pred, x, noise, t, "linear")

    def bwd(f, pred, x, noise, t):
        return _grad(f(pred, x, noise, t, "linear"), [pred])

    impls = _impls(ops.velocity_mse, ref.velocity_mse)
    return [
        _case("velocity_mse", "fwd", size, shape, dtype, device, 3 * n * es, make,
              _variants(impls, fwd), 3 * n * es),
        # forward reads 3n; backward reads pred, x, noise and writes dpred
        _case("velocity_mse", "fwd+bwd", size, shape, dtype, device, 7 * n * es, make,
              _variants(impls, bwd), 4 * n * es),
    ]


def mse_cases(shape, dtype, device, size) -> list[Case]:
    n = math.prod(shape)
    es = torch.tensor([], dtype=dtype).element_size()

    def make():
        return dict(pred=torch.randn(shape, dtype=dtype, device=device, requires_grad=True),
                    target=torch.randn(shape, dtype=dtype, device=device))

    def fwd(f, pred, target):
        return f(pred, target)

    def bwd(f, pred, target):
        return _grad(f(pred, target), [pred])

    impls = _impls(ops.mse, ref.mse)
    return [
        _case("mse", "fwd", size, shape, dtype, device, 2 * n * es, make, _variants(impls, fwd), 2 * n * es),
        _case("mse", "fwd+bwd", size, shape, dtype, device, 5 * n * es, make, _variants(impls, bwd),
              3 * n * es),
    ]


def _adaln_inputs(shape, dtype, device, grad):
    """x, h and the six modulation vectors as chunk(6) views of one [B, 6D]
    tensor, as a SiT block makes them."""
    b, _, d = shape
    return dict(x=torch.randn(shape, dtype=dtype, device=device, requires_grad=grad),
                h=torch.randn(shape, dtype=dtype, device=device, requires_grad=grad),
                params=torch.randn(b, 6 * d, dtype=dtype, device=device, requires_grad=grad),
                g=torch.randn(shape, dtype=dtype, device=device) if grad else None)


def adaln_cases(shape, dtype, device, size) -> list[Case]:
    """ln_modulate, gated_residual_ln_modulate and gated_residual, with the
    modulation vectors as strided chunk(6) views; backward to x, h and the
    [B, 6D] modulation tensor."""
    n = math.prod(shape)
    es = torch.tensor([], dtype=dtype).element_size()

    def ln_fwd(impl, x, h, params, g):
        shift, scale = params.chunk(6, dim=1)[:2]
        return impl.ln_modulate(x, shift, scale)

    def ln_bwd(impl, x, h, params, g):
        return _grad(ln_fwd(impl, x, h, params, g), [x, params], [g])

    def grlm_fwd(impl, x, h, params, g):
        _, _, gate, shift, scale, _ = params.chunk(6, dim=1)
        return impl.gated_residual_ln_modulate(x, h, gate, shift, scale)

    def grlm_bwd(impl, x, h, params, g):
        return _grad(grlm_fwd(impl, x, h, params, g), [x, h, params], [g, g])

    def gr_fwd(impl, x, h, params, g):
        return impl.gated_residual(x, h, params.chunk(6, dim=1)[5])

    def gr_bwd(impl, x, h, params, g):
        return _grad(gr_fwd(impl, x, h, params, g), [x, h, params], [g])

    class Compiled:  # the references, each compiled on its own
        ln_modulate = torch.compile(ref.ln_modulate, dynamic=False)
        gated_residual_ln_modulate = torch.compile(ref.gated_residual_ln_modulate, dynamic=False)
        gated_residual = torch.compile(ref.gated_residual, dynamic=False)

    impls = {"fused": ops, "eager": ref, "compiled": Compiled}
    cases = []
    # (name, forward, backward, bytes forward, bytes forward + backward, footprint), in elements.
    for name, fwd, bwd, nf, nb, foot in [
        ("ln_modulate", ln_fwd, ln_bwd, 2, 5, 3),                # x -> y; dy, x -> dx
        ("gated_residual_ln_modulate", grlm_fwd, grlm_bwd, 4, 10, 6),  # x, h -> x_out, y; 4 in, 2 out
        ("gated_residual", gr_fwd, gr_bwd, 3, 6, 4),             # x, h -> out; g, h -> dh
    ]:
        cases.append(_case(name, "fwd", size, shape, dtype, device, nf * n * es,
                           lambda: _adaln_inputs(shape, dtype, device, False), _variants(impls, fwd),
                           foot * n * es))
        cases.append(_case(name, "fwd+bwd", size, shape, dtype, device, nb * n * es,
                           lambda: _adaln_inputs(shape, dtype, device, True), _variants(impls, bwd),
                           foot * n * es))
    return cases


OP_FAMILIES: dict[str, Callable[..., list[Case]]] = {
    "interpolant": interpolant_cases,
    "velocity_mse": velocity_mse_cases,
    "mse": mse_cases,
    "adaln": adaln_cases,
}


def default_batches(device: torch.device, quick: bool) -> list[int]:
    if device.type == "cuda":
        return [32] if quick else [8, 32, 128, 256]
    return [4] if quick else [4, 16]


# ----------------------------------------------------------------- running


def machine_info(device: torch.device) -> dict:
    info = {
        "malloc": os.environ.get("GLIBC_TUNABLES", "default"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "device": str(device),
        "build": build_info(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_cases(cases: list[Case], device: torch.device, copy_gbs: float | None,
              log: Callable[[str], None] = print) -> list[dict]:
    rows = []
    for case in cases:
        row = {"op": case.op, "mode": case.mode, "size": case.size, "shape": list(case.shape),
               "dtype": str(case.dtype).removeprefix("torch."), "bytes": case.bytes}
        for variant, seconds in time_medians(case.run, device).items():
            row[variant] = {"ms": seconds * 1e3, "gbs": case.bytes / seconds / 1e9}
        for other in ("eager", "compiled"):
            if other in row:
                row[f"x_vs_{other}"] = row[other]["ms"] / row["fused"]["ms"]
        if copy_gbs:
            row["pct_of_copy"] = 100 * row["fused"]["gbs"] / copy_gbs
        rows.append(row)
        log(format_row(row))
    return rows


def format_header() -> str:
    return (f"{'op':<28}{'mode':<9}{'size':<6}{'shape':<18}{'dtype':<10}"
            f"{'fused ms':>10}{'eager ms':>10}{'compiled':>10}{'x eager':>9}{'x compile':>10}"
            f"{'GB/s':>8}{'% copy':>8}")


def format_row(row: dict) -> str:
    def ms(v):
        return f"{row[v]['ms']:>10.3f}" if v in row else f"{'-':>10}"

    pct = f"{row['pct_of_copy']:>8.1f}" if "pct_of_copy" in row else f"{'-':>8}"
    shape = "x".join(str(s) for s in row["shape"])
    return (f"{row['op']:<28}{row['mode']:<9}{row['size']:<6}{shape:<18}{row['dtype']:<10}"
            f"{ms('fused')}{ms('eager')}{ms('compiled')}"
            f"{row.get('x_vs_eager', float('nan')):>9.2f}{row.get('x_vs_compiled', float('nan')):>10.2f}"
            f"{row['fused']['gbs']:>8.1f}{pct}")


def run(ops_: list[str], device: str = "cpu", dtypes: list[str] | None = None,
        batches: list[int] | None = None, quick: bool = False, out: str | None = None,
        log: Callable[[str], None] = print) -> dict:
    """Runs the op benchmarks and writes JSON to `out` (when given)."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA requested but no CUDA device is available")
    dtypes = dtypes or (["bfloat16", "float32"] if dev.type == "cuda" else ["float32"])
    batches = batches or default_batches(dev, quick)
    sizes = SIT_SIZES[-1:] if quick else SIT_SIZES
    unknown = set(ops_) - set(OP_FAMILIES)
    if unknown:
        raise SystemExit(f"unknown op(s) {sorted(unknown)}: choose from {sorted(OP_FAMILIES)}")

    _allow_recompiles()
    copy_gbs = copy_bandwidth(dev) if dev.type == "cuda" else None
    result = {"meta": machine_info(dev), "copy_bandwidth_gbs": copy_gbs, "results": []}
    log(f"# {result['meta'].get('device_name', result['meta']['cpu'])}, torch {torch.__version__}"
        + (f", copy bandwidth {copy_gbs:.0f} GB/s" if copy_gbs else ""))
    log(format_header())
    for op in ops_:
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            for size, d in sizes:
                for b in batches:
                    cases = OP_FAMILIES[op]((b, TOKENS, d), dtype, dev, f"{size}")
                    result["results"] += run_cases(cases, dev, copy_gbs, log)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        log(f"# wrote {out}")
    return result


# ------------------------------------------------------------------ models

MODEL_VARIANTS = ("fused", "unfused", "fused+compile", "unfused+compile")


def model_cases(name: str, batch: int, device: torch.device, dtype: torch.dtype,
                compile_: bool = True) -> list[tuple[str, dict[str, Callable[[], object]]]]:
    """A training step (forward, backward, AdamW) and a sampling forward of a
    SiT preset on 32x32x4 latents, fused and unfused, eager and compiled.
    bfloat16 on CUDA runs under autocast with float32 weights."""
    import copy

    from .models import SiT_models

    torch.manual_seed(0)
    base = SiT_models[name]().to(device)
    x = torch.randn(batch, 4, 32, 32, device=device)
    t = torch.rand(batch, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    target = torch.randn_like(x)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    if dtype != torch.float32 and device.type == "cpu":
        base = base.to(dtype)  # CPU: plain low-precision weights
        x, target = x.to(dtype), target.to(dtype)
        autocast = torch.autocast("cpu", enabled=False)

    train, sample = {}, {}
    for variant in MODEL_VARIANTS:
        if "compile" in variant and not compile_:
            continue
        model = copy.deepcopy(base)
        model.fused = variant.startswith("fused")
        runner = torch.compile(model, dynamic=False) if "compile" in variant else model
        # fused AdamW (one kernel per step) where torch has it, for every variant alike
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, fused=True)

        def step(runner=runner, model=model, optimizer=optimizer):
            model.train()
            with autocast:
                loss = (runner(x, t, y).float() - target.float()).square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def forward(runner=runner, model=model):
            model.eval()
            with torch.no_grad(), autocast:
                return runner(x, t, y)

        train[variant], sample[variant] = step, forward
    return [("train step", train), ("sample forward", sample)]


def format_model_header() -> str:
    return (f"{'model':<10}{'mode':<16}{'batch':>6}{'dtype':>10}"
            + "".join(f"{v:>17}" for v in MODEL_VARIANTS) + f"{'x eager':>9}{'x compiled':>11}")


def format_model_row(row: dict) -> str:
    ms = "".join(f"{row[v]['ms']:>14.1f} ms" if v in row else f"{'-':>17}" for v in MODEL_VARIANTS)
    return (f"{row['model']:<10}{row['mode']:<16}{row['batch']:>6}{row['dtype']:>10}{ms}"
            f"{row.get('x_eager', float('nan')):>9.2f}{row.get('x_compiled', float('nan')):>11.2f}")


def run_models(device: str = "cpu", models: list[str] | None = None, batch: int | None = None,
               dtype: str | None = None, compile_: bool = True, out: str | None = None,
               log: Callable[[str], None] = print) -> dict:
    """Model benchmarks (see model_cases); x eager = unfused / fused, x
    compiled = unfused+compile / fused+compile."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA requested but no CUDA device is available")
    _allow_recompiles()
    models = models or (["SiT-XL/2"] if dev.type == "cuda" else ["SiT-S/2"])
    batch = batch or (32 if dev.type == "cuda" else 2)
    dtype_ = getattr(torch, dtype or ("bfloat16" if dev.type == "cuda" else "float32"))
    result = {"meta": machine_info(dev), "results": []}
    log(f"# {result['meta'].get('device_name', result['meta']['cpu'])}, torch {torch.__version__}")
    log(format_model_header())
    for name in models:
        for mode, fns in model_cases(name, batch, dev, dtype_, compile_):
            row = {"model": name, "mode": mode, "batch": batch, "dtype": str(dtype_).removeprefix("torch.")}
            for variant, seconds in time_medians(fns, dev, warmup=3, min_rounds=5, min_seconds=1.0).items():
                row[variant] = {"ms": seconds * 1e3}
            row["x_eager"] = row["unfused"]["ms"] / row["fused"]["ms"]
            if "fused+compile" in row:
                row["x_compiled"] = row["unfused+compile"]["ms"] / row["fused+compile"]["ms"]
            result["results"].append(row)
            log(format_model_row(row))
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        log(f"# wrote {out}")
    return result
