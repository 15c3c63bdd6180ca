"""The op cases: each fused op at the SiT sizes, its eager reference and
torch.compile(reference, dynamic=False), forward and forward + backward, with
the bytes each must move.

"fwd" is the forward of a training step (the inputs require grad), so that one
torch.compile of each (op, shape, dtype) serves both modes. Bandwidth counts
the bytes that must move: each input read once and each output written once,
in each tensor's own dtype. dtype "autocast" is the mixed case of a model under
bf16 autocast: float32 residual stream x (and data x, noise, target), bfloat16
Linear outputs (h, the modulation vectors, pred), y written in bfloat16.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from .. import ops
from .. import reference as ref
from .harness import _message

# (name, D) of the SiT sizes; T = 256 tokens (SiT-*/2 at 256x256).
SIT_SIZES = [("S", 384), ("B", 768), ("XL", 1152)]
TOKENS = 256
VARIANTS = ("fused", "eager", "compiled")
AUTOCAST = "autocast"
AUTOCAST_DTYPE = torch.bfloat16


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


def mlp_cases(shape, dtype, device, size, compile_: bool = True) -> list[Case]:
    """gelu_mlp (fc1, tanh GELU, fc2; H = 4D, fc2's bias folded elsewhere as
    in the model) against the Linear, GELU, Linear chain; backward to x and the
    three parameters. No autocast case: under autocast the op runs on the
    bfloat16 casts of its inputs, the bfloat16 case. Bytes are each input and
    output once: the GEMMs make this op compute-bound, so its GB/s is low by
    nature; the ratios to eager and compiled are what tell."""
    dtype = _dtype_name(dtype)
    if dtype == AUTOCAST:
        return []
    dt = getattr(torch, dtype)
    n, d = math.prod(shape), shape[-1]
    weights = 2 * 4 * d * d + 4 * d  # w1, w2, b1

    def make(shape, grads):
        d = shape[-1]
        inputs = dict(x=torch.randn(shape, dtype=dt, device=device, requires_grad=True),
                      w1=(torch.randn(4 * d, d, dtype=dt, device=device) / d ** 0.5).requires_grad_(),
                      b1=torch.randn(4 * d, dtype=dt, device=device, requires_grad=True),
                      w2=(torch.randn(d, 4 * d, dtype=dt, device=device) / (2 * d ** 0.5)).requires_grad_())
        if grads:
            inputs["g"] = torch.randn(shape, dtype=dt, device=device)
        return inputs

    def fwd(f, x, w1, b1, w2, g=None):
        return f(x, w1, b1, w2)

    def bwd(f, x, w1, b1, w2, g):
        return _grad(f(x, w1, b1, w2), [x, w1, b1, w2], [g])

    # forward: read x and the weights, write out. backward: read d out, x and the weights, write their gradients.
    return _cases("gelu_mlp", size, shape, dtype, _impls(ops.gelu_mlp, ref.gelu_mlp, compile_), make, fwd, bwd,
                  _nbytes((n, dt), (weights, dt), (n, dt)), _nbytes((2 * n, dt), (2 * weights, dt), (n, dt)))


OP_FAMILIES: dict[str, Callable[..., list[Case]]] = {
    "interpolant": interpolant_cases,
    "velocity_mse": velocity_mse_cases,
    "mse": mse_cases,
    "adaln": adaln_cases,
    "mlp": mlp_cases,
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
