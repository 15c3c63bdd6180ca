"""The timing harness: medians of variants that take turns, CUDA graphs, the
copy ceiling, and the run budget's clock.

Op timing on a GPU: each variant is captured in one CUDA graph that runs it
once on each of several copies of the inputs (together at least 4x the L2
cache, so that the cache does not serve them), and the median time of graph
replays, measured with CUDA events, is divided by the calls in the graph: the
GPU's time, without Python's launch overhead. A variant that cannot be captured
is timed with events around the same calls launched back to back ("timing":
"events" in the JSON, `*` in the table), and so is the fused op's "launch"
time, what a user who does not use graphs sees. On the CPU: perf_counter around
each call ("timing": "wall"). Medians after a warm-up; the variants take turns.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence

import torch

# The budget's clock. The runners call harness.now(), not a copy of it, so that a test can replace it.
now = time.perf_counter


def budget_spent(start: float, budget: float | None) -> bool:
    return budget is not None and now() - start >= budget


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
