"""Whole steps in one CUDA graph: a training step (forward, loss, backward,
clipping, optimizer) or a sampler's model evaluation, captured once over
static input buffers and replayed, so that each step costs one launch.

What cannot be captured is refused in one line: the CPU, inputs whose shape
or dtype changes after the capture, adaptive solvers (they choose their steps
on the host), an optimizer that is not capturable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

WARMUP = 3  # eager runs on a side stream before the capture, as PyTorch documents


def check_device(device: torch.device | str, what: str) -> None:
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"{what}: CUDA graphs need a CUDA device, got {device}")
    if not torch.cuda.is_available():
        raise ValueError(f"{what}: CUDA graphs need a CUDA device, and none is available")


class StaticGraph:
    """fn(*inputs) captured in one CUDA graph. Calling it copies the inputs into
    the static buffers, replays the graph and returns fn's outputs, which live
    in the graph's memory and are overwritten by the next call."""

    def __init__(self, fn: Callable[..., object], inputs: Sequence[Tensor], what: str, warmup: int = WARMUP,
                 after_warmup: Callable[[], None] | None = None):
        if not inputs or not all(isinstance(x, Tensor) for x in inputs):
            raise TypeError(f"{what}: the captured inputs must be tensors")
        check_device(inputs[0].device, what)
        self.what = what
        self.static = [x.detach().clone() for x in inputs]
        device = self.static[0].device
        # Under autocast, its weight-cast cache stays off: a cast cached in the
        # warm-up would be read by the graph after autocast frees it.
        autocast = torch.is_autocast_enabled("cuda")
        no_cache = torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=autocast,
                                  cache_enabled=False)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), no_cache:
            for _ in range(warmup):
                fn(*self.static)
        torch.cuda.current_stream(device).wait_stream(side)
        if after_warmup is not None:
            after_warmup()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), no_cache:
            self.outputs = fn(*self.static)

    def __call__(self, *inputs: Tensor):
        if len(inputs) != len(self.static):
            raise ValueError(f"{self.what}: captured with {len(self.static)} inputs, got {len(inputs)}")
        for i, (buffer, x) in enumerate(zip(self.static, inputs)):
            if x.shape != buffer.shape or x.dtype != buffer.dtype or x.device != buffer.device:
                raise ValueError(
                    f"{self.what}: input {i} was captured as {tuple(buffer.shape)} {buffer.dtype} on "
                    f"{buffer.device}, got {tuple(x.shape)} {x.dtype} on {x.device}: a CUDA graph replays fixed "
                    "shapes (keep the batch size fixed, or run without the graph)")
            buffer.copy_(x)
        self.graph.replay()
        return self.outputs


class GraphedField:
    """A sampler's field v(x, t), captured on its first call and replayed after.
    Each call returns a fresh tensor: multistep and Heun solvers keep earlier
    velocities, which the next replay would overwrite."""

    def __init__(self, field: Callable[[Tensor, Tensor], Tensor], what: str = "cuda_graph sampling"):
        self.field, self.what = field, what
        self.graph: StaticGraph | None = None

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        if self.graph is None:
            self.graph = StaticGraph(self.field, (x, t), self.what)
        return self.graph(x, t).clone()


def _state_tensors(optimizer: torch.optim.Optimizer) -> Iterable[Tensor]:
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, Tensor):
                yield value


def check_optimizer(optimizer: torch.optim.Optimizer, what: str) -> None:
    """A captured optimizer step keeps its step count on the GPU: capturable=True
    (or a fused optimizer, which is capturable)."""
    for group in optimizer.param_groups:
        if not (group.get("capturable") or group.get("fused")):
            raise ValueError(f"{what}: the optimizer must be built with capturable=True (or fused=True) to be "
                             "captured in a CUDA graph")


class CapturedTrainStep:
    """One training step in one CUDA graph: loss_fn(*inputs) (forward and
    loss, drawing its random times and noise inside the graph), backward,
    gradient clipping and optimizer.step(). Returns the loss (a 0-d tensor in
    the graph's memory).

    The warm-up runs real steps: the parameters, the optimizer state and the
    CUDA random state are put back afterwards, so that the replays continue
    exactly where eager training would. Gradients live in the graph's memory
    from then on: call nothing that sets them to None (zero_grad) between
    replays."""

    def __init__(self, loss_fn: Callable[..., Tensor], params: Sequence[Tensor],
                 optimizer: torch.optim.Optimizer, inputs: Sequence[Tensor], grad_clip: float | None = None,
                 what: str = "cuda_graph training step"):
        check_device(inputs[0].device, what)
        check_optimizer(optimizer, what)
        self.params = [p for p in params if p.requires_grad]
        device = inputs[0].device
        saved_params = [p.detach().clone() for p in self.params]
        saved_state = {id(t): t.clone() for t in _state_tensors(optimizer)}
        saved_rng = torch.cuda.get_rng_state(device)

        def step(*xs: Tensor) -> Tensor:
            loss = loss_fn(*xs)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(self.params, grad_clip, foreach=True)
            optimizer.step()
            return loss.detach()

        def restore() -> None:
            with torch.no_grad():
                for p, saved in zip(self.params, saved_params):
                    p.copy_(saved)
                for t in _state_tensors(optimizer):  # state made by the warm-up starts from zero
                    t.copy_(saved_state[id(t)]) if id(t) in saved_state else t.zero_()
            torch.cuda.set_rng_state(saved_rng, device)
            optimizer.zero_grad(set_to_none=True)  # the capture's backward allocates them in the graph

        optimizer.zero_grad(set_to_none=True)
        self.graph = StaticGraph(step, inputs, what, after_warmup=restore)

    def __call__(self, *inputs: Tensor) -> Tensor:
        return self.graph(*inputs)
