"""Benchmarks: each fused op against its eager reference and against
torch.compile(reference, dynamic=False), forward and forward + backward; and
the SiT model matrix: {fused, unfused} x {eager, torch.compile, CUDA graph},
the train step and the guided sampling step.

Op timing on a GPU: each variant is captured in one CUDA graph that runs it
once on each of several copies of the inputs (together at least 4x the L2
cache, so that the cache does not serve them), and the median time of graph
replays, measured with CUDA events, is divided by the calls in the graph: the
GPU's time, without Python's launch overhead. A variant that cannot be captured
is timed with events around the same calls launched back to back ("timing":
"events" in the JSON, `*` in the table), and so is the fused op's "launch"
time, what a user who does not use graphs sees. On the CPU: perf_counter around
each call ("timing": "wall"). Medians after a warm-up; the variants take turns.

"fwd" is the forward of a training step (the inputs require grad), so that one
torch.compile of each (op, shape, dtype) serves both modes. Bandwidth counts
the bytes that must move: each input read once and each output written once,
in each tensor's own dtype. dtype "autocast" is the mixed case of a model under
bf16 autocast: float32 residual stream x (and data x, noise, target), bfloat16
Linear outputs (h, the modulation vectors, pred), y written in bfloat16.

Run it through `python bench/run.py` or `sit-ext bench`.
"""

from __future__ import annotations

import datetime
import functools
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from . import ops
from . import reference as ref
from ._build import build_info

# (name, D) of the SiT sizes; T = 256 tokens (SiT-*/2 at 256x256).
SIT_SIZES = [("S", 384), ("B", 768), ("XL", 1152)]
TOKENS = 256
VARIANTS = ("fused", "eager", "compiled")
AUTOCAST = "autocast"
AUTOCAST_DTYPE = torch.bfloat16

_now = time.perf_counter  # the budget's clock


def _print(line: str) -> None:
    print(line, flush=True)  # a run cut off by a time limit keeps its lines


@dataclass
class Case:
    """One op at one size: variants[name](**make()) runs it once."""

    op: str
    mode: str  # "fwd" or "fwd+bwd"
    size: str
    shape: tuple
    dtype: str  # a torch dtype's name, or "autocast"
    bytes: int
    make: Callable[[], dict]
    variants: dict[str, Callable[..., object]] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)  # per tensor, for the mixed case
    skip: str | None = None  # why the installed fused op cannot run it


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


def _time_once(fn: Callable[[], object], device: torch.device,
               clock: Callable[[], float] = time.perf_counter) -> float:
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3
    t0 = clock()
    fn()
    return clock() - t0


def time_medians(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int = 3,
                 min_rounds: int = 7, min_seconds: float = 0.5,
                 clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per call of each fn, after `warmup` calls of each: at
    least min_rounds rounds, and more (500 at most) until min_seconds have
    passed. The variants take turns, round by round, so that a slow spell of a
    noisy machine hits them all alike. `clock` (seconds) times the CPU's calls
    (CUDA's are timed with events) and the rounds."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    start = clock()
    rounds = 0
    while rounds < min_rounds or (clock() - start < min_seconds and rounds < 500):
        for name, fn in fns.items():
            samples[name].append(_time_once(fn, device, clock))
        rounds += 1
    return {name: statistics.median(v) for name, v in samples.items()}


def _message(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def _in_turn(calls: Sequence[Callable[[], object]]) -> Callable[[], None]:
    def run():
        for call in calls:
            call()
    return run


def _repeated(fn: Callable[[], object], times: int) -> Callable[[], object]:
    if times == 1:
        return fn

    def run():
        for _ in range(times):
            fn()
    return run


def warm_up(calls: Sequence[Callable[[], object]], device: torch.device, passes: int) -> None:
    """Runs the calls `passes` times; on CUDA on a side stream, as PyTorch
    documents before a capture (this is also where torch.compile compiles)."""
    if device.type != "cuda":
        for _ in range(passes):
            _in_turn(calls)()
        return
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(passes):
            _in_turn(calls)()
    torch.cuda.current_stream(device).wait_stream(side)


def capture_graph(calls: Sequence[Callable[[], object]], device: torch.device):
    """(graph, "") with the calls captured in turn in one CUDA graph, or
    (None, why not). Warm the calls up first (see warm_up)."""
    if device.type != "cuda":
        return None, f"no CUDA graphs on {device.type}"
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.current_stream(device)
    collecting = gc.isenabled()
    gc.disable()  # a collection that frees another graph during a capture is a CUDA error
    try:
        with torch.cuda.graph(graph):
            _in_turn(calls)()
        return graph, ""
    except Exception as e:  # a variant that cannot be captured is timed with events instead
        why = _message(e)
    finally:
        if collecting:
            gc.enable()
    torch.cuda.set_stream(stream)  # a failing capture_end leaves the graph's capture stream current
    del graph
    torch.cuda.synchronize(device)
    gc.collect()
    return None, why


# Events span about this much GPU work per sample (graph replays or eager loops
# repeated), so that the start of a sample costs under 1%.
_SAMPLE_SECONDS = 1e-3


def time_variants(calls: dict[str, Sequence[Callable[[], object]]], device: torch.device,
                  launch: Iterable[str] = (), clock: Callable[[], float] = time.perf_counter) -> dict[str, dict]:
    """Seconds per call of each variant. calls[name] runs the variant once on
    each input copy; on CUDA a graph runs them all (see the module docstring).

    Returns {name: {"seconds", "timing"}}, with "timing" "graph", "events" or
    "wall" (CPU), and "graph_error" when CUDA graph capture failed; {name:
    {"error"}} for a variant that fails outright. Each name in `launch` is also
    timed launched eagerly, as f"{name}_launch". `clock`: see time_medians."""
    cuda = device.type == "cuda"
    launch = set(launch)
    timed: dict[str, tuple[Callable[[], object], int, str]] = {}
    report: dict[str, dict] = {}
    graphs = []  # alive until the timing ends
    for name, variant_calls in calls.items():
        try:
            warm_up(variant_calls, device, passes=2 if cuda else 3)
            graph, why = capture_graph(variant_calls, device)
        except Exception as e:  # reported in the row, the run goes on
            report[name] = {"error": _message(e)}
            if cuda:
                torch.cuda.empty_cache()
            continue
        report[name] = {"graph_error": why} if cuda and graph is None else {}
        if graph is not None:
            graphs.append(graph)
            timed[name] = (graph.replay, len(variant_calls), "graph")
            if name in launch:
                timed[f"{name}_launch"] = (_in_turn(variant_calls), len(variant_calls), "events")
        else:
            timed[name] = (_in_turn(variant_calls), len(variant_calls), "events" if cuda else "wall")
    fns, calls_per_sample = {}, {}
    for name, (fn, n_calls, _) in timed.items():
        times = 1
        if cuda:
            first = _time_once(fn, device, clock)  # also the graph's first replay, which uploads it
            times = max(1, min(100, math.ceil(_SAMPLE_SECONDS / max(first, 1e-7))))
        fns[name], calls_per_sample[name] = _repeated(fn, times), n_calls * times
    settings = dict(warmup=0, min_rounds=15, min_seconds=0.1) if cuda else dict(warmup=0)
    seconds = time_medians(fns, device, clock=clock, **settings) if fns else {}
    for name, (_, _, timing) in timed.items():
        report.setdefault(name, {}).update(seconds=seconds[name] / calls_per_sample[name], timing=timing)
    return report


def copy_bandwidth(device: torch.device) -> float:
    """Device copy bandwidth in GB/s: a large copy, counting bytes read + written,
    launched eagerly (a 1 GiB copy makes launch costs negligible). Not from a
    CUDA graph: a captured copy becomes a memcpy node, which ran at 2.76 TB/s on
    an H200 against 4.15 TB/s for the copy kernel, below what the ops reach."""
    n = (1 << 28) if device.type == "cuda" else (1 << 25)  # 1 GiB / 128 MiB of fp32
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    seconds = time_medians({"copy": lambda: dst.copy_(src)}, device)["copy"]
    return 2 * src.numel() * src.element_size() / seconds / 1e9


def _footprint(inputs: dict) -> int:
    return sum(t.numel() * t.element_size() for t in inputs.values() if isinstance(t, torch.Tensor))


def _copies(device: torch.device, footprint: int) -> int:
    """Input copies to cycle through: on a GPU, together at least 4x the L2."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return max(1, min(16, math.ceil(4 * l2 / max(footprint, 1))))


# ---------------------------------------------------------------- op cases


def _nbytes(*tensors: tuple[int, torch.dtype]) -> int:
    """Bytes of (numel, dtype) tensors, each counted once."""
    return sum(n * dtype.itemsize for n, dtype in tensors)


def _dtype_name(dtype: str | torch.dtype) -> str:
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def _grad(outputs, inputs, grads=None):
    return torch.autograd.grad(outputs, inputs, grads)


def _compiled(reference):
    """torch.compile of a reference function, or of each function of a namespace
    (a class of static methods, which is callable too: compiling the class itself
    left its methods eager, and the "compiled" column of the AdaLN ops of one H200
    run timed eager code)."""
    if not isinstance(reference, type):
        return torch.compile(reference, dynamic=False)
    names = [n for n in vars(reference) if not n.startswith("_")]
    return SimpleNamespace(**{n: torch.compile(getattr(reference, n), dynamic=False) for n in names})


def _impls(fused, reference, compile_: bool = True) -> dict:
    impls = {"fused": fused, "eager": reference}
    if compile_:
        impls["compiled"] = _compiled(reference)
    return impls


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


def _variants(impls: dict, body: Callable) -> dict[str, Callable]:
    """{variant: fn(**inputs)} that runs body(implementation, **inputs)."""
    return {name: functools.partial(body, impl) for name, impl in impls.items()}


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for item in out for t in _flat(item)] if isinstance(out, (tuple, list)) else []


def _mixed_unsupported(impls: dict, bodies: Sequence[Callable], make: Callable[[], dict]) -> str | None:
    """Why the installed fused op cannot run the mixed-dtype case (None when it
    can): on small inputs, its outputs and gradients must come back in the
    reference's dtypes and agree with it to within bfloat16 rounding."""
    try:
        inputs = make()
        for body in bodies:
            got, want = _flat(body(impls["fused"], **inputs)), _flat(body(impls["eager"], **inputs))
            for g, w in zip(got, want, strict=True):
                if g.dtype != w.dtype:
                    return f"returned {_dtype_name(g.dtype)} where the reference returns {_dtype_name(w.dtype)}"
                if not torch.allclose(g.float(), w.float(), rtol=0.05, atol=0.05):
                    return "its result differs from the reference"
    except Exception as e:  # an op that rejects mixed dtypes: the case is skipped
        return _message(e)
    return None


def _cases(op, size, shape, dtype, impls, make, fwd, bwd, bytes_fwd, bytes_bwd, dtypes=None) -> list[Case]:
    """The fwd and fwd+bwd cases of one op; make(shape, grads) builds inputs.
    A mixed-dtype (autocast) case is checked on small inputs first."""
    skip = None
    if dtype == AUTOCAST:
        small = (2, 4, 8)
        skip = _mixed_unsupported(impls, (fwd, bwd), lambda: make(small, True))
    return [Case(op, "fwd", size, tuple(shape), dtype, bytes_fwd, lambda: make(shape, False),
                 _variants(impls, fwd), dict(dtypes or {}), skip),
            Case(op, "fwd+bwd", size, tuple(shape), dtype, bytes_fwd + bytes_bwd, lambda: make(shape, True),
                 _variants(impls, bwd), dict(dtypes or {}), skip)]


def interpolant_cases(shape, dtype, device, size, compile_: bool = True) -> list[Case]:
    """x_t and u_t of the linear path; backward to x and noise. No autocast
    case: under autocast x and noise are float32 data, the float32 case."""
    dtype = _dtype_name(dtype)
    if dtype == AUTOCAST:
        return []
    dt, f32 = getattr(torch, dtype), torch.float32
    n, b = math.prod(shape), shape[0]

    def make(shape, grads):
        inputs = dict(x=torch.randn(shape, dtype=dt, device=device, requires_grad=True),
                      noise=torch.randn(shape, dtype=dt, device=device, requires_grad=True),
                      t=torch.rand(shape[0], device=device))
        if grads:
            inputs["g"] = torch.randn(shape, dtype=dt, device=device)
        return inputs

    def fwd(f, x, noise, t, g=None):
        return f(x, noise, t, "linear")

    def bwd(f, x, noise, t, g):
        return _grad(f(x, noise, t, "linear"), [x, noise], [g, g])

    # forward: read x, noise, t; write x_t, u_t. backward: read both grads and t; write dx, dnoise.
    return _cases("interpolant", size, shape, dtype, _impls(ops.interpolant, ref.interpolant, compile_), make,
                  fwd, bwd, _nbytes((2 * n, dt), (b, f32), (2 * n, dt)), _nbytes((2 * n, dt), (b, f32), (2 * n, dt)))


def _loss_dtypes(dtype: str) -> tuple[torch.dtype, torch.dtype]:
    """(pred, data) dtypes: under autocast the model predicts in bfloat16 while
    x, noise and the target stay float32."""
    if dtype == AUTOCAST:
        return AUTOCAST_DTYPE, torch.float32
    return getattr(torch, dtype), getattr(torch, dtype)


def velocity_mse_cases(shape, dtype, device, size, compile_: bool = True) -> list[Case]:
    """Per-sample velocity MSE with the target computed inside; backward to pred."""
    dtype = _dtype_name(dtype)
    dp, dd = _loss_dtypes(dtype)
    f32 = torch.float32
    n, b = math.prod(shape), shape[0]

    def make(shape, grads):
        return dict(pred=torch.randn(shape, dtype=dp, device=device, requires_grad=True),
                    x=torch.randn(shape, dtype=dd, device=device),
                    noise=torch.randn(shape, dtype=dd, device=device),
                    t=torch.rand(shape[0], device=device))

    def fwd(f, pred, x, noise, t):
        return f(pred, x, noise, t, "linear")

    def bwd(f, pred, x, noise, t):
        return _grad(f(pred, x, noise, t, "linear"), [pred])

    mixed = {"pred": _dtype_name(dp), "x": _dtype_name(dd), "noise": _dtype_name(dd)} if dtype == AUTOCAST else None
    # forward: read pred, x, noise, t; write the loss. backward: read the loss's grad, pred, x, noise, t; write dpred.
    return _cases("velocity_mse", size, shape, dtype, _impls(ops.velocity_mse, ref.velocity_mse, compile_), make,
                  fwd, bwd, _nbytes((n, dp), (2 * n, dd), (b, f32), (1, f32)),
                  _nbytes((1, f32), (n, dp), (2 * n, dd), (b, f32), (n, dp)), mixed)


def mse_cases(shape, dtype, device, size, compile_: bool = True) -> list[Case]:
    """Mean squared error over all elements; backward to pred."""
    dtype = _dtype_name(dtype)
    dp, dd = _loss_dtypes(dtype)
    f32 = torch.float32
    n = math.prod(shape)

    def make(shape, grads):
        return dict(pred=torch.randn(shape, dtype=dp, device=device, requires_grad=True),
                    target=torch.randn(shape, dtype=dd, device=device))

    def fwd(f, pred, target):
        return f(pred, target)

    def bwd(f, pred, target):
        return _grad(f(pred, target), [pred])

    mixed = {"pred": _dtype_name(dp), "target": _dtype_name(dd)} if dtype == AUTOCAST else None
    # forward: read pred, target; write the loss. backward: read the loss's grad, pred, target; write dpred.
    return _cases("mse", size, shape, dtype, _impls(ops.mse, ref.mse, compile_), make, fwd, bwd,
                  _nbytes((n, dp), (n, dd), (1, f32)), _nbytes((1, f32), (n, dp), (n, dd), (n, dp)), mixed)


class _AdaLNReference:
    """The references, with y cast to out_dtype: under autocast the official
    model computes y in float32 (float32 x with bfloat16 vectors, by type
    promotion) and the next Linear casts it to bfloat16."""

    @staticmethod
    def ln_modulate(x, shift, scale, out_dtype=None):
        y = ref.ln_modulate(x, shift, scale)
        return y if out_dtype is None else y.to(out_dtype)

    @staticmethod
    def gated_residual_ln_modulate(x, h, gate, shift, scale, out_dtype=None):
        x_out, y = ref.gated_residual_ln_modulate(x, h, gate, shift, scale)
        return x_out, (y if out_dtype is None else y.to(out_dtype))

    @staticmethod
    def gated_residual(x, h, gate):
        return ref.gated_residual(x, h, gate)


def _adaln_dtypes(dtype: str) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
    """(x, h and the modulation vectors, y): under autocast the residual stream
    stays float32 while the Linear outputs are bfloat16, and y feeds a Linear."""
    if dtype == AUTOCAST:
        return torch.float32, AUTOCAST_DTYPE, AUTOCAST_DTYPE
    return (getattr(torch, dtype),) * 3


def adaln_cases(shape, dtype, device, size, compile_: bool = True) -> list[Case]:
    """ln_modulate, gated_residual_ln_modulate and gated_residual, with the
    modulation vectors as strided chunk(6) views of one [B, 6D] tensor, as a
    SiT block makes them; backward to x, h and that tensor."""
    dtype = _dtype_name(dtype)
    dx, dm, dy = _adaln_dtypes(dtype)
    mixed = dtype == AUTOCAST
    out = {"out_dtype": dy} if mixed else {}
    n, v = math.prod(shape), shape[0] * shape[-1]  # [B, T, D] activations, [B, D] vectors

    def maker(with_h: bool, grads: tuple[str, ...]):
        def make(shape, want_grads):
            b, _, d = shape
            inputs = dict(x=torch.randn(shape, dtype=dx, device=device, requires_grad=True),
                          params=torch.randn(b, 6 * d, dtype=dm, device=device, requires_grad=True))
            if with_h:
                inputs["h"] = torch.randn(shape, dtype=dm, device=device, requires_grad=True)
            for g in grads if want_grads else ():
                inputs[g] = torch.randn(shape, dtype=dx if g == "gx" else dy, device=device)
            return inputs
        return make

    def ln_fwd(impl, x, params, gy=None):
        shift, scale = params.chunk(6, dim=1)[:2]
        return impl.ln_modulate(x, shift, scale, **out)

    def ln_bwd(impl, x, params, gy):
        return _grad(ln_fwd(impl, x, params), [x, params], [gy])

    def grlm_fwd(impl, x, h, params, gx=None, gy=None):
        _, _, gate, shift, scale, _ = params.chunk(6, dim=1)
        return impl.gated_residual_ln_modulate(x, h, gate, shift, scale, **out)

    def grlm_bwd(impl, x, h, params, gx, gy):
        return _grad(grlm_fwd(impl, x, h, params), [x, h, params], [gx, gy])

    def gr_fwd(impl, x, h, params, gx=None):
        return impl.gated_residual(x, h, params.chunk(6, dim=1)[5])

    def gr_bwd(impl, x, h, params, gx):
        return _grad(gr_fwd(impl, x, h, params), [x, h, params], [gx])

    impls = _impls(ops, _AdaLNReference, compile_)
    label = {"x": _dtype_name(dx), "h": _dtype_name(dm), "shift_scale_gate": _dtype_name(dm),
             "y": _dtype_name(dy)} if mixed else None
    x_, h_, y_ = (n, dx), (n, dm), (n, dy)
    vec = [(v, dm)]  # one [B, D] modulation vector (or its gradient)
    # (name, forward, backward, make, bytes forward, bytes backward): each input read once, each output written once.
    table = [
        # x, shift, scale -> y. backward: dy, x, scale -> dx, dshift, dscale.
        ("ln_modulate", ln_fwd, ln_bwd, maker(False, ("gy",)),
         _nbytes(x_, *2 * vec, y_), _nbytes(y_, x_, *vec, x_, *2 * vec)),
        # x, h, gate, shift, scale -> x_out, y. backward: d x_out, dy, x_out, h, gate, scale -> dx, dh, 3 vectors.
        ("gated_residual_ln_modulate", grlm_fwd, grlm_bwd, maker(True, ("gx", "gy")),
         _nbytes(x_, h_, *3 * vec, x_, y_), _nbytes(x_, y_, x_, h_, *2 * vec, x_, h_, *3 * vec)),
        # x, h, gate -> out. backward: d out, h, gate -> dh, dgate (dx is d out itself).
        ("gated_residual", gr_fwd, gr_bwd, maker(True, ("gx",)),
         _nbytes(x_, h_, *vec, x_), _nbytes(x_, h_, *vec, h_, *vec)),
    ]
    cases = []
    for name, fwd, bwd, make, nf, nb in table:
        cases += _cases(name, size, shape, dtype, impls, make, fwd, bwd, nf, nb, label)
    return cases


OP_FAMILIES: dict[str, Callable[..., list[Case]]] = {
    "interpolant": interpolant_cases,
    "velocity_mse": velocity_mse_cases,
    "mse": mse_cases,
    "adaln": adaln_cases,
}


def default_batches(device: torch.device, quick: bool) -> list[int]:
    if device.type == "cuda":
        return [32] if quick else [32, 256]
    return [4] if quick else [4, 16]


def default_sizes(device: torch.device, quick: bool) -> list[tuple[str, int]]:
    """Largest first, so that a run cut short by its budget has measured them."""
    if quick:
        return SIT_SIZES[-1:]
    sizes = [s for s in SIT_SIZES if s[0] != "S"] if device.type == "cuda" else SIT_SIZES
    return sorted(sizes, key=lambda s: -s[1])


def default_dtypes(device: torch.device) -> list[str]:
    return ["bfloat16", AUTOCAST, "float32"] if device.type == "cuda" else ["float32"]


def plan_cases(ops_: Sequence[str], device: torch.device, dtypes: Sequence[str], sizes, batches,
               compile_: bool = True) -> list[Case]:
    """Every case, in the order they run: size, then batch, then dtype, then
    op, so that a budget cuts the least telling ones."""
    cases = []
    for size, d in sizes:
        for b in batches:
            for dtype in dtypes:
                for op in ops_:
                    cases += OP_FAMILIES[op]((b, TOKENS, d), dtype, device, size, compile_)
    return cases


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


def _write_json(path: str | None, result: dict) -> None:
    """Writes atomically: a run killed mid-write leaves the previous file."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)


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


def _budget_spent(start: float, budget: float | None) -> bool:
    return budget is not None and _now() - start >= budget


def run(ops_: list[str], device: str = "cpu", dtypes: list[str] | None = None,
        batches: list[int] | None = None, quick: bool = False, out: str | None = None,
        log: Callable[[str], None] = _print, *, budget: float | None = None, compile_: bool = True) -> dict:
    """Runs the op benchmarks and writes JSON to `out` (when given) after every
    row. With a `budget` in seconds (from this call), no case starts once it is
    spent; result["skipped"] counts the cases left out."""
    start = _now()
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
        if _budget_spent(start, budget):
            result["skipped"] = len(cases) - i
            log(f"# budget of {budget:g} s spent after {_now() - start:.0f} s: "
                f"skipped {result['skipped']} of {len(cases)} cases")
            break
        row = run_case(case, dev, copy_gbs)
        result["results"].append(row)
        log(format_row(row))
        _write_json(out, result)
    result["seconds"] = _now() - start
    _write_json(out, result)
    if out:
        log(f"# wrote {out}")
    return result


# ------------------------------------------------------------------ models

MODEL_VARIANTS = ("fused", "unfused", "fused+compile", "unfused+compile", "fused+graph", "unfused+graph")
MODEL_MODES = ("train step", "guided sample step")
CFG_SCALE = 4.0

# Dense (no sparsity) bf16 tensor-core peaks from the datasheets, TFLOP/s; the
# first name found in the device's name applies.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0))


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def sit_forward_flops(model, batch: int) -> float:
    """Multiply-add FLOPs (2 each) of one SiT forward on `batch` images: every
    Linear on the tokens (qkv, proj, fc1, fc2, the final layer), the patch
    embedding, attention's scores and values (4 B T^2 D a block), and the
    per-sample Linears (adaLN modulation, time and label embedding)."""
    tokens = model.pos_embed.shape[1]
    per_token = sum(m.in_features * m.out_features for name, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear)
                    and (name.startswith("blocks.") and "adaLN" not in name or name == "final_layer.linear"))
    per_sample = sum(m.in_features * m.out_features for name, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and ("adaLN" in name or "t_embedder" in name))
    embed = model.x_embedder.proj.weight.numel()  # [D, C, p, p]: one multiply-add per weight and token
    attention = 2 * tokens * model.blocks[0].attn.qkv.in_features * len(model.blocks)
    return 2.0 * batch * (tokens * (per_token + embed + attention) + per_sample)


def model_step_flops(model, mode: str, batch: int) -> float:
    """A train step is forward + backward (3 forwards); a guided sampling step
    runs the model on both halves (2 B)."""
    return 3 * sit_forward_flops(model, batch) if mode == "train step" else sit_forward_flops(model, 2 * batch)


class _ModelRig:
    """One SiT preset with its AdamW (and torch.compile wrapper), shared by
    every variant and batch: the variants differ only in model.fused, the
    runner they call and (+graph) one CUDA graph per step."""

    def __init__(self, name: str, device: torch.device, dtype: torch.dtype, compile_: bool):
        from .models import SiT_models

        torch.manual_seed(0)
        self.device, self.dtype = device, dtype
        self.model = SiT_models[name]().to(device)
        if dtype != torch.float32 and device.type == "cpu":
            self.model = self.model.to(dtype)  # CPU: plain low-precision weights
        # fused AdamW (one kernel per step, capturable) where torch has it, for every variant alike
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0, fused=True)
        self.compiled = torch.compile(self.model, dynamic=False) if compile_ else None

    def cases(self, batch: int) -> list[tuple[str, dict[str, Callable[[], Callable[[], object]]]]]:
        """[(mode, {variant: build() -> step()})]: a graph variant captures
        when built, so that the harness can free one before the next."""
        from .cuda_graphs import CapturedTrainStep, StaticGraph
        from .transport import Transport

        device, dtype, model, optimizer = self.device, self.dtype, self.model, self.optimizer
        x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, device=device)
        y = torch.randint(0, model.num_classes, (batch,), device=device)
        noise = torch.randn_like(x)
        t = torch.full((batch,), 0.5, device=device)
        both_y = torch.cat([y, torch.full_like(y, model.num_classes)])
        cuda = device.type == "cuda"
        lowp = dtype != torch.float32
        if lowp and not cuda:
            x, noise = x.to(dtype), noise.to(dtype)

        def autocast():  # no cast cache: the graph variants cast inside the graph
            return torch.autocast(device.type, dtype=dtype, enabled=lowp and cuda, cache_enabled=False)

        train, sample = {}, {}
        for variant in MODEL_VARIANTS:
            if "compile" in variant and self.compiled is None or "graph" in variant and not cuda:
                continue
            runner = self.compiled if "compile" in variant else model
            fused = variant.startswith("fused")
            transport = Transport("linear", fused=fused)

            def losses(x, y, runner=runner, transport=transport, fused=fused):
                model.fused = fused
                model.train()
                with autocast():
                    return transport.training_losses(runner, x, model_kwargs={"y": y})["loss"].mean()

            def sample_step(z, runner=runner, fused=fused):
                model.fused = fused
                model.eval()
                with torch.no_grad(), autocast():
                    out = runner(z.repeat(2, 1, 1, 1), t.repeat(2), both_y)
                    cond, uncond = out[:, :model.in_channels].float().chunk(2)
                    return z - 0.02 * (uncond + CFG_SCALE * (cond - uncond))

            if "graph" in variant:
                def train_build(losses=losses):
                    step = CapturedTrainStep(losses, list(model.parameters()), optimizer, (x, y),
                                             what="graph variant")
                    return lambda: step(x, y)

                def sample_build(sample_step=sample_step):
                    graph = StaticGraph(sample_step, (noise,), "graph variant")
                    return lambda: graph(noise)
            else:
                def train_build(losses=losses):
                    def step():
                        loss = losses(x, y)
                        optimizer.zero_grad(set_to_none=True)  # never into a graph variant's gradients
                        loss.backward()
                        optimizer.step()
                    return step

                def sample_build(sample_step=sample_step):
                    return lambda: sample_step(noise)
            train[variant], sample[variant] = train_build, sample_build
        return [("train step", train), ("guided sample step", sample)]


def model_cases(name: str, batch: int, device: torch.device, dtype: torch.dtype,
                compile_: bool = True) -> list[tuple[str, dict[str, Callable[[], Callable[[], object]]]]]:
    """A training step (interpolant, forward, velocity loss, backward, AdamW)
    and a guided sampling step (both halves in one batch, then an Euler step)
    of a SiT preset, {fused, unfused} x {eager, torch.compile, CUDA graph}.
    bfloat16 on CUDA runs under autocast with float32 weights."""
    return _ModelRig(name, device, dtype, compile_).cases(batch)


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
    MFU against `peak` TFLOP/s."""
    times = {v: row[v]["ms"] for v in MODEL_VARIANTS if "ms" in row.get(v, {})}
    fused = {v: ms for v, ms in times.items() if v.startswith("fused")}
    unfused = {v: ms for v, ms in times.items() if v.startswith("unfused")}
    row["tflop"] = flops / 1e12
    for v, ms in times.items():
        row[v]["tflops"] = flops / (ms / 1e3) / 1e12
        if peak:
            row[v]["mfu"] = row[v]["tflops"] / peak
    if fused and unfused:
        row["best_fused"], row["best_unfused"] = min(fused, key=fused.get), min(unfused, key=unfused.get)
        row["x_best_unfused"] = unfused[row["best_unfused"]] / fused[row["best_fused"]]


def top_kernels(durations: Iterable[tuple[str, float]], steps: int, top: int = 15) -> dict:
    """(name, microseconds) per kernel launch -> the `top` names by total time,
    with calls, total ms and share of all the time, over `steps` steps."""
    totals: dict[str, float] = {}
    calls: dict[str, int] = {}
    for name, us in durations:
        totals[name] = totals.get(name, 0.0) + us
        calls[name] = calls.get(name, 0) + 1
    busy = sum(totals.values())
    ranked = sorted(totals, key=lambda k: -totals[k])[:top]
    return {"steps": steps, "busy_ms_per_step": busy / 1e3 / steps,
            "top": [{"name": k, "calls": calls[k], "total_ms": totals[k] / 1e3,
                     "share": totals[k] / busy if busy else 0.0} for k in ranked]}


def profile_kernels(fn: Callable[[], object], device: torch.device, steps: int = 3, top: int = 15) -> dict:
    """torch.profiler over `steps` calls of fn: the top CUDA kernels by total
    GPU time (on the CPU, the top operators by self CPU time)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    fn()
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        _sync(device)
    if cuda:
        durations = [(e.name, e.time_range.end - e.time_range.start) for e in prof.events()
                     if e.device_type == DeviceType.CUDA]
    else:
        durations = [(e.name, e.self_cpu_time_total) for e in prof.events()
                     if e.device_type == DeviceType.CPU and not e.is_async]
    return {"what": "CUDA kernels" if cuda else "CPU operators (self time)"} | top_kernels(durations, steps, top)


def format_profile(title: str, profile: dict) -> list[str]:
    if "error" in profile:
        return [f"# profile {title}: {profile['error']}"]
    lines = [f"# profile {title}: {profile['what']}, busy {profile['busy_ms_per_step']:.1f} ms per step "
             f"(over {profile['steps']} steps)",
             f"#  {'share':>6} {'total ms':>9} {'calls':>6}  name"]
    for k in profile["top"]:
        lines.append(f"#  {100 * k['share']:>5.1f}% {k['total_ms']:>9.2f} {k['calls']:>6}  {k['name'][:110]}")
    return lines


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
    start = _now()
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
        if _budget_spent(start, budget):
            break
        if rig_name != name:
            rig = None
            _free(dev)
            rig, rig_name = _ModelRig(name, dev, dtype_, compile_), name
        for mode, builders in rig.cases(b):
            if _budget_spent(start, budget):
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
        log(f"# budget of {budget:g} s spent after {_now() - start:.0f} s: skipped {total - done} of {total} cases")
    result["seconds"] = _now() - start
    _write_json(out, result)
    if out:
        log(f"# wrote {out}")
    return result


# ---------------------------------------------------------------- dispatch

DISPATCH_SHAPE = (2, 4, 64)  # [B, T, D]: small enough that only the per-call cost is timed
DISPATCH_MODEL = dict(hidden_size=64, num_layers=4, num_heads=4)  # the vector SiT of the step row
DISPATCH_GOAL = 1.0  # fused / unfused wall time, at most


def _vector_step(fused: bool, batch: int, dim: int, tokens: int) -> Callable[[], None]:
    """One training step of a small vector SiT as `sit-ext train` runs it:
    interpolant, model, velocity loss, backward, AdamW; fused or not throughout."""
    from .models import SiT
    from .transport import Transport

    torch.manual_seed(0)
    model = SiT.build(dim, fused=fused, **DISPATCH_MODEL)
    transport = Transport("linear", fused=fused)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    x = torch.randn(batch, tokens, dim)
    generator = torch.Generator().manual_seed(0)

    def step():
        loss = transport.training_losses(model, x, generator=generator)["loss"].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def dispatch_cases() -> list[tuple[str, dict[str, Callable[[], object]]]]:
    """(name, {"fused", "unfused"}) at DISPATCH_SHAPE: each op family's
    forward + backward against its eager reference chain, then the vector SiT
    training step."""
    cases = []
    for family in OP_FAMILIES.values():
        for case in family(DISPATCH_SHAPE, "float32", torch.device("cpu"), "tiny", compile_=False):
            if case.mode == "fwd+bwd":
                inputs = case.make()
                cases.append((case.op, {"fused": functools.partial(case.variants["fused"], **inputs),
                                        "unfused": functools.partial(case.variants["eager"], **inputs)}))
    b, t, d = DISPATCH_SHAPE
    cases.append((f"vector SiT train step ({DISPATCH_MODEL['num_layers']} blocks, D={DISPATCH_MODEL['hidden_size']})",
                  {"fused": _vector_step(True, b, d, t), "unfused": _vector_step(False, b, d, t)}))
    return cases


def run_dispatch(out: str | None = None, log: Callable[[str], None] = _print, calls: int = 50) -> dict:
    """The cost of a call where the kernels do almost nothing: every fused op's
    forward + backward and the small vector SiT step, fused against unfused, on
    one CPU thread, at DISPATCH_SHAPE. Each sample times `calls` calls back to
    back; medians of the samples, the variants taking turns."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        device = torch.device("cpu")
        result = {"meta": machine_info(device), "shape": list(DISPATCH_SHAPE), "threads": 1,
                  "goal": DISPATCH_GOAL, "results": []}
        log(f"# {result['meta']['cpu']}, torch {torch.__version__}, one thread, shape "
            f"{'x'.join(map(str, DISPATCH_SHAPE))}: microseconds per forward + backward")
        log(f"{'case':<44}{'fused us':>10}{'unfused us':>12}{'fused/unfused':>15}  goal <= {DISPATCH_GOAL:.2f}")
        for name, fns in dispatch_cases():
            seconds = time_medians({k: _repeated(f, calls) for k, f in fns.items()}, device, warmup=2,
                                   min_rounds=15, min_seconds=1.0)
            row = {"case": name, "fused_us": seconds["fused"] / calls * 1e6,
                   "unfused_us": seconds["unfused"] / calls * 1e6}
            row["ratio"] = row["fused_us"] / row["unfused_us"]
            row["meets_goal"] = row["ratio"] <= DISPATCH_GOAL
            result["results"].append(row)
            log(f"{name:<44}{row['fused_us']:>10.1f}{row['unfused_us']:>12.1f}{row['ratio']:>15.2f}"
                f"  {'yes' if row['meets_goal'] else 'NO'}")
        _write_json(out, result)
        if out:
            log(f"# wrote {out}")
        return result
    finally:
        torch.set_num_threads(threads)
