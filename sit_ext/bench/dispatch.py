"""The dispatch benchmark (`sit-ext bench --dispatch`): the cost of a call
where the kernels do almost nothing, fused against unfused."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from .harness import _repeated, time_medians
from .op_cases import OP_FAMILIES
from .report import _print, _write_json, machine_info

DISPATCH_SHAPE = (2, 4, 64)  # [B, T, D]: small enough that only the per-call cost is timed
DISPATCH_MODEL = dict(hidden_size=64, num_layers=4, num_heads=4)  # the vector SiT of the step row
DISPATCH_GOAL = 1.0  # fused / unfused wall time, at most


def _vector_step(fused: bool, batch: int, dim: int, tokens: int) -> Callable[[], None]:
    """One training step of a small vector SiT as `sit-ext train` runs it:
    interpolant, model, velocity loss, backward, AdamW; fused or not throughout."""
    from ..models import SiT
    from ..transport import Transport

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
