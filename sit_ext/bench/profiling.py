"""Kernel profiles: the top CUDA kernels (on the CPU, operators) of a step by
total time, from torch.profiler."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from .harness import _sync


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
