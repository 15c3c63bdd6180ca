"""Property tests (hypothesis) of every sit_ext op: interpolant, velocity_mse,
mse, ln_modulate, gated_residual_ln_modulate and gated_residual, forward and
every gradient, against the pure-PyTorch reference run in float64.

Drawn: shapes with B = 0 or T = 0 and D from 1 to 5000 (primes and the
vector-width edges often); float32/float64/float16/bfloat16 and the mixed
dtypes the ops accept (t and the coefficient table in any dtype; pred and
target each in its own; float32 x with bfloat16/float16 h and modulation, y
in either); contiguous, strided, storage-offset, expanded (stride 0),
transposed and narrowed (chunk) views, the modulation vectors also as
chunk(6, dim=1) views of one tensor; values of size 1, tiny and huge, rows
with a large mean (1e4 + 1e-2 noise), constant rows, pred a relative 1e-3
from its target, and inf/NaN at drawn places; t with exact 0 and 1; the
schedules "linear", "cosine", "vp" and the coefficient table; output masks,
which outputs feed the loss, which inputs need a gradient.

Checked (helpers.assert_matches_ref), for each output and for the gradient of
each op argument: dtype, shape and
- finiteness: non-finite wherever the float64 reference is; finite wherever
  it is, except that ±inf may stand for a value the allowed error takes past
  the dtype's largest. Not "wherever eager PyTorch is": eager float16
  overflows in intermediates (a x + b eps, (pred - target)^2) where the
  kernels compute in float32 and stay right. NaN and inf are not told apart:
  on a LayerNorm row holding inf the kernels' dx is ±inf where autograd's is
  NaN;
- elsewhere, |fused - ref64| <= 2 e + atol max|ref64| + one rounding to the
  output's dtype, where e is the larger error of eager PyTorch (the reference
  at the inputs' own dtypes) and of the float64 reference on inputs off by up
  to 4 roundings of the op's compute precision (float32; float64 when any
  input is): float64 eager is the reference itself, and eager float16 can
  overflow where the op does not.
The float64 references: LayerNorm rows shifted by their first element (exact,
and LayerNorm ignores it), so rows with a large mean have an exact reference;
gated_residual_ln_modulate's y from x_out as stored in x's dtype, as the op
documents; the VP schedule without the cancellation of sqrt(1 - alpha^2)
(exact_vp). Elements of a view's base outside the view are NaN: a kernel that
reads past its view fails.

Left out (skipped_samples): the gradient of t on samples holding inf or NaN
(the kernels take the chain rule through (a, b, a', b') with 0 x inf
conventions of their own: an unused gradient or a zero coefficient
contributes 0; see the tests at the end). t = ±inf is not drawn for the VP
schedule: outside [0, 1] it is not settled (reference.py holds t in [0, 1],
the kernels do not).

Budget: 2,400 examples in all by default (about 1.5 min on 2 busy cores);
SIT_EXT_FUZZ_EXAMPLES=N runs N in all (10000 for the long run). Derandomized:
the same examples on every run; SIT_EXT_TEST_SEED=n draws others.

Deliberate errors it caught (monkeypatched outputs of the custom ops, each
caught at the default budget): y of ln_modulate off by 1e-3 (relative); eps
ignored in LayerNorm; the last column off by 0.01 when D % 8 != 0 (a vector
tail); dt of the interpolant (and the coefficient gradients) off by 0.1 %;
NaN turned into 0 in the interpolant's outputs; a strided x read as if
contiguous; x_t returned in float32 for a 16-bit x; the output mask ignored;
velocity_mse averaging over n - 1 elements; an infinite velocity_mse clamped
to the largest float; mse's dtarget with the wrong sign on one element;
gated_residual's dgate summed over all but the last token; a storage offset
ignored; a crash on empty input; gated_residual_ln_modulate's dscale off by
0.1 %.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pytest
import torch
from conftest import ATOL
from helpers import assert_matches_ref
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from sit_ext import ops
from sit_ext import reference as ref

pytestmark = pytest.mark.fuzz

# ------------------------------------------------------------------- budget

TOTAL_EXAMPLES = int(os.environ.get("SIT_EXT_FUZZ_EXAMPLES") or 2400)
SHARE = {"interpolant": 0.2, "velocity_mse": 0.2, "mse": 0.1, "ln_modulate": 0.15,
         "gated_residual_ln_modulate": 0.2, "gated_residual": 0.15}
_SEED = int(os.environ.get("SIT_EXT_TEST_SEED", "0"))

settings.register_profile(
    "sit_ext-fuzz", derandomize=_SEED == 0, database=None, deadline=None, print_blob=False,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])


def fuzz(op):
    """The op's share of the examples, under the sit_ext-fuzz profile."""
    config = settings(settings.get_profile("sit_ext-fuzz"), max_examples=max(1, round(TOTAL_EXAMPLES * SHARE[op])))

    def decorate(test):
        test = config(test)
        return seed(_SEED)(test) if _SEED else test

    return decorate


@pytest.fixture(autouse=True)
def _one_thread():
    """Examples are small: one intra-op thread is about twice as fast on 2 cores.
    (test_*_ops.py check that results do not depend on the thread count.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ inputs

CAP = 20_000  # elements per tensor: keeps an example cheap
MAX_TOKENS = 200
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LOW = [torch.float16, torch.bfloat16]
# D: small primes, the CPU vector widths and their neighbours, model widths, large primes; or any.
DIMS = st.one_of(st.sampled_from([1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 127, 257, 384, 1021, 1152, 2039,
                                  2050, 4093, 4099, 4999, 5000]), st.integers(1, 5000))
# Tiny and huge magnitudes per dtype: far from 1, while squares, row sums and the products with a
# coefficient (magnitude up to 1e3) stay in range of the accumulation dtype (float32 for the
# 16-bit dtypes). float16's huge one overflows float16 itself in a x + b eps and x + gate h.
MAGNITUDES = {torch.float64: [1e-100, 1e100], torch.float32: [1e-30, 1e12], torch.bfloat16: [1e-30, 1e12],
              torch.float16: [1e-4, 2e4]}
COEFFICIENT_MAGNITUDES = [1.0, 1e-3, 1e3]
LAYOUTS = ["contiguous", "strided", "offset", "expanded", "transposed", "narrow"]
SPECIAL_VALUES = [math.inf, -math.inf, math.nan]


@dataclass
class Spec:
    """One tensor argument: the op sees view_of(layout, base), of `shape`."""

    shape: tuple
    dtype: torch.dtype
    layout: tuple = ("contiguous", 0)  # (kind, axis); ("chunk6", (i, j, k)) for the modulation
    values: tuple = ("normal", 1.0)  # (kind, magnitude or mean)
    grad: bool = True
    specials: tuple = ()  # ((position, value), ...) in the values (of the base if expanded or chunk6)


def base_shape(layout, shape):
    kind, axis = layout
    if kind == "strided":
        return (*shape[:-1], 2 * shape[-1])
    if kind == "narrow":
        return (*shape[:-1], 3 * shape[-1])
    if kind == "chunk6":
        return (*shape[:-1], 6 * shape[-1])
    if kind == "offset":
        return (math.prod(shape) + 1,)
    if kind == "expanded":
        return tuple(1 if i == axis else s for i, s in enumerate(shape))
    if kind == "transposed":
        return (*shape[:-2], shape[-1], shape[-2])
    return tuple(shape)


def view_of(layout, base, shape):
    kind, axis = layout
    if kind == "strided":
        return base[..., ::2]
    if kind == "narrow":  # the middle one of chunk(3, dim=-1)
        return base.narrow(-1, shape[-1], shape[-1])
    if kind == "chunk6":
        chunks = base.chunk(6, dim=-1)
        return tuple(chunks[i] for i in axis)
    if kind == "offset":
        return base[1:].view(shape)
    if kind == "expanded":
        return base.expand(shape)
    if kind == "transposed":
        return base.transpose(-2, -1)
    return base


def draw_values(gen, shape, values):
    kind, a = values
    if kind == "time":  # t in [0, 1], with exact 0 and 1 when `a`
        t = torch.rand(shape, generator=gen, dtype=torch.float64)
        return torch.where(torch.rand(shape, generator=gen, dtype=torch.float64) < 0.3, t.round(), t) if a else t
    n = torch.randn(shape, generator=gen, dtype=torch.float64)
    if kind == "large_mean":
        return a + 1e-2 * n
    if kind == "constant_rows" and len(shape):
        return a * n[..., :1].expand(shape).clone()
    if kind == "positive":
        return a * n.abs()
    return a * n


def materialize(spec, gen):
    """The base tensor of a spec, on the CPU in its dtype; elements outside the view are NaN."""
    kind = spec.layout[0]
    full = base_shape(spec.layout, spec.shape)
    if kind in ("expanded", "chunk6"):  # values for the base itself
        vals = draw_values(gen, full, spec.values)
    else:
        vals = draw_values(gen, spec.shape, spec.values)
    flat = vals.view(-1)
    for position, value in spec.specials if flat.numel() else ():
        flat[position % flat.numel()] = value
    if kind in ("expanded", "chunk6"):
        return vals.to(spec.dtype)
    base = torch.full(full, math.nan, dtype=torch.float64)
    view_of(spec.layout, base, spec.shape).copy_(vals)
    return base.to(spec.dtype)


@st.composite
def layouts(draw, shape, kinds=tuple(LAYOUTS), axis=None):
    ok = [k for k in kinds if k == "contiguous" or k == "offset" or len(shape) >= (2 if k == "transposed" else 1)]
    kind = draw(st.sampled_from(ok))
    if kind == "expanded" and axis is None:
        return kind, draw(st.integers(0, len(shape) - 1))
    return kind, axis or 0


@st.composite
def data_values(draw, dtype, kinds=("normal", "large_mean", "constant_rows")):
    kind = draw(st.sampled_from(kinds))
    if kind == "large_mean":
        return kind, draw(st.sampled_from([1e4, -1e4, 1e3, 1e2]))
    return kind, draw(st.sampled_from([1.0, 1.0, *MAGNITUDES[dtype]]))


SPECIALS = st.lists(st.tuples(st.integers(0, 2**20), st.sampled_from(SPECIAL_VALUES)), min_size=1, max_size=3)


@st.composite
def specials_for(draw, names):
    """inf/NaN for about one example in five, written into one or two of the named inputs."""
    if draw(st.integers(0, 4)) != 0:
        return {}
    hit = draw(st.lists(st.sampled_from(names), min_size=1, max_size=2, unique=True))
    return {name: tuple(draw(SPECIALS)) for name in hit}


def with_specials(specs, specials, schedule=None):
    for name, values in specials.items():
        if name == "t" and schedule == "vp":  # t = inf: the VP schedule outside [0, 1] is not settled
            values = tuple((i, math.nan) for i, _ in values)
        specs[name].specials = values
    return specs


# -------------------------------------------------------------------- cases


@dataclass
class Case:
    op: str
    params: dict
    specs: dict  # name -> Spec
    outputs: list  # (shape, dtype) of each fused output; shape None for an output masked off
    used: list  # which outputs the loss takes
    seed: int


def acc_dtype(*dtypes):
    return torch.float64 if torch.float64 in dtypes else torch.float32


def tokens(top):
    """A middle dim: mostly a few, up to `top` (and MAX_TOKENS) at times."""
    top = min(MAX_TOKENS, top)
    return st.one_of(st.integers(0, min(4, top)), st.integers(0, top))


@st.composite
def sample_shape(draw):
    """[B, ...] with 1 to 4 dims for the interpolant family; B or a middle dim may be 0."""
    ndim = draw(st.integers(1, 4))
    if ndim == 1:
        return (draw(st.integers(0, 64)),)
    dim = draw(DIMS)
    batch = draw(st.integers(0, min(6, CAP // dim)))
    shape = [batch]
    for _ in range(ndim - 2):
        shape.append(draw(tokens(CAP // max(1, math.prod(shape) * dim))))
    return (*shape, dim)


@st.composite
def time_specs(draw, batch, coefficients):
    """t [B] (any float dtype and layout, exact 0 and 1 sometimes), or the coefficient table [B, 4]."""
    dtype = draw(st.sampled_from(FLOATS))
    if coefficients:
        shape = (batch, 4)
        values = ("normal", draw(st.sampled_from(COEFFICIENT_MAGNITUDES)))
        return Spec(shape, dtype, draw(layouts(shape)), values, draw(st.booleans()))
    layout = draw(layouts((batch,), ("contiguous", "strided", "offset", "expanded")))
    return Spec((batch,), dtype, layout, ("time", draw(st.booleans())), draw(st.booleans()))


@st.composite
def interpolant_cases(draw):
    shape = draw(sample_shape())
    dtype = draw(st.sampled_from(FLOATS))
    coefficients = draw(st.booleans())
    specs = {name: Spec(shape, dtype, draw(layouts(shape)), draw(data_values(dtype)), draw(st.booleans()))
             for name in ("x", "noise")}
    specs["coef" if coefficients else "t"] = draw(time_specs(shape[0], coefficients))
    outputs = draw(st.sampled_from([(True, True), (True, False), (False, True), (False, False)]))
    params = dict(schedule="linear" if coefficients else draw(st.sampled_from(["linear", "cosine", "vp"])),
                  coefficients=coefficients, outputs=outputs)
    return Case("interpolant", params, with_specials(specs, draw(specials_for(list(specs))), params["schedule"]),
                [(shape if on else None, dtype) for on in outputs], list(outputs), draw(st.integers(0, 2**32 - 1)))


@st.composite
def velocity_mse_cases(draw):
    shape = draw(sample_shape())
    pred_dtype, x_dtype = draw(st.sampled_from(FLOATS)), draw(st.sampled_from(FLOATS))
    coefficients = draw(st.booleans())
    specs = {"pred": Spec(shape, pred_dtype, draw(layouts(shape)), draw(data_values(pred_dtype)), draw(st.booleans()))}
    for name in ("x", "noise"):
        specs[name] = Spec(shape, x_dtype, draw(layouts(shape)), draw(data_values(x_dtype)), draw(st.booleans()))
    specs["coef" if coefficients else "t"] = draw(time_specs(shape[0], coefficients))
    loss_dtype = acc_dtype(pred_dtype, x_dtype)
    if draw(st.booleans()):
        layout = draw(layouts((shape[0],), ("contiguous", "strided", "offset", "expanded")))
        kind = draw(st.sampled_from(["positive", "normal"]))
        specs["weight"] = Spec((shape[0],), loss_dtype, layout, (kind, 1.0), draw(st.booleans()))
    reduction = draw(st.sampled_from(["mean", "none"]))
    # pred a relative 1e-3 from the target: the loss sums squares of near-cancelling differences
    near = specs["pred"].layout[0] != "expanded" and draw(st.integers(0, 3)) == 0
    params = dict(schedule="linear" if coefficients else draw(st.sampled_from(["linear", "cosine", "vp"])),
                  coefficients=coefficients, reduction=reduction, near=near)
    out_shape = (shape[0],) if reduction == "none" else ()
    return Case("velocity_mse", params, with_specials(specs, draw(specials_for(list(specs))), params["schedule"]),
                [(out_shape, loss_dtype)], [True], draw(st.integers(0, 2**32 - 1)))


@st.composite
def mse_cases(draw):
    ndim = draw(st.integers(0, 3))
    shape = []
    for i in range(ndim):
        top = CAP // max(1, math.prod(shape))
        shape.append(draw(DIMS if i == ndim - 1 and top >= 5000 else st.integers(0, min(top, 64))))
    shape = tuple(shape)
    specs = {}
    for name in ("pred", "target"):
        dtype = draw(st.sampled_from(FLOATS))
        specs[name] = Spec(shape, dtype, draw(layouts(shape)), draw(data_values(dtype)), draw(st.booleans()))
    near = specs["target"].layout[0] != "expanded" and draw(st.integers(0, 3)) == 0
    loss_dtype = acc_dtype(specs["pred"].dtype, specs["target"].dtype)
    return Case("mse", dict(near=near), with_specials(specs, draw(specials_for(list(specs)))),
                [((), loss_dtype)], [True], draw(st.integers(0, 2**32 - 1)))


MODULATION_LAYOUTS = ("contiguous", "offset", "expanded", "narrow")


@st.composite
def adaln_cases(draw, op):
    dim = draw(DIMS)
    batch = draw(st.integers(0, min(4, CAP // dim)))
    if draw(st.booleans()):
        shape = (batch, draw(tokens(CAP // max(1, batch * dim))), dim)
    else:
        shape = (batch, dim)
    x_dtype = draw(st.sampled_from(FLOATS))
    low = draw(st.sampled_from([x_dtype, *LOW] if x_dtype == torch.float32 else [x_dtype]))
    residual = op != "ln_modulate"
    specs = {"x": Spec(shape, x_dtype, draw(layouts(shape)), draw(data_values(x_dtype)), draw(st.booleans()))}
    if residual:
        specs["h"] = Spec(shape, low, draw(layouts(shape)), draw(data_values(low)), draw(st.booleans()))
    names = {"ln_modulate": ("shift", "scale"), "gated_residual": ("gate",)}.get(op, ("shift", "scale", "gate"))
    mod_shape = (batch, dim)
    if draw(st.booleans()):  # chunk(6, dim=1) of one [B, 6D] tensor, as in a SiT block
        picks = draw(st.permutations(range(6)))[:3]
        specs["mod"] = Spec(mod_shape, low, ("chunk6", tuple(picks)), ("normal", 1.0), draw(st.booleans()))
    else:  # inner stride 1 is required, unless D = 1
        kinds = MODULATION_LAYOUTS + (("strided", "transposed") if dim == 1 else ())
        for name in names:
            axis = None if dim == 1 else 0
            specs[name] = Spec(mod_shape, low, draw(layouts(mod_shape, kinds, axis)), ("normal", 1.0),
                               draw(st.booleans()))
    # eps = 0: a variance that underflows (tiny rows) or a single element would divide by 0
    tiny = any(specs[n].values[1] < 1e-3 for n in ("x", "h") if n in specs)
    params = dict(eps=draw(st.sampled_from([1e-6, 1e-5, 1e-2] + ([0.0] if dim > 1 and not tiny else []))))
    if op == "gated_residual":
        outputs, used = [(shape, x_dtype)], [True]
    else:
        y_dtype = draw(st.sampled_from([None, x_dtype, low]))
        params["out_dtype"] = y_dtype
        outputs = [(shape, y_dtype or x_dtype)]
        used = [True]
        if residual:
            outputs.insert(0, (shape, x_dtype))
            used = list(draw(st.sampled_from([(True, True), (True, False), (False, True)])))
    return Case(op, params, with_specials(specs, draw(specials_for(list(specs)))), outputs, used,
                draw(st.integers(0, 2**32 - 1)))


# ------------------------------------------------------------------ the ops


class _StoredAs(torch.autograd.Function):
    """v rounded to a dtype and back, with the identity as derivative: a
    value as the op stores it, for the float64 reference."""

    @staticmethod
    def forward(ctx, v, dtype):
        return v.to(dtype).to(v.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _time(views, params, exact=False):
    """(t, schedule, keywords) for the ops' time arguments; for the float64
    reference of the VP schedule, its coefficients from exact_vp."""
    if params["coefficients"]:
        return None, "linear", dict(coefficients=list(views["coef"].unbind(1)))
    if exact and params["schedule"] == "vp":
        return None, "linear", dict(coefficients=list(exact_vp(views["t"])))
    return views["t"], params["schedule"], {}


def exact_vp(t):
    """reference.schedule_coefficients(t, "vp") without its cancellation: beta
    = sqrt(1 - alpha^2) loses digits for small t (20 ulps at t = 0.02, and
    more in beta' and the gradient of t); sqrt(-expm1(-2 L)), with alpha =
    exp(-L), does not."""
    span = ref.VP_BETA_MAX - ref.VP_BETA_MIN
    log_rate = 0.25 * t * t * span + 0.5 * t * ref.VP_BETA_MIN
    alpha, slope = torch.exp(-log_rate), -(0.5 * t * span + 0.5 * ref.VP_BETA_MIN)
    beta = torch.sqrt(-torch.expm1(-2 * log_rate))
    return alpha, beta, alpha * slope, -alpha * alpha * slope / beta


def _modulation(views):
    if "mod" in views:
        return views["mod"]
    return views.get("shift"), views.get("scale"), views.get("gate")


def call(case, impl, views, exact):
    """The op's outputs under impl (ops, or the reference: exact for float64)."""
    p, v = case.params, views
    if case.op == "interpolant":
        t, schedule, kw = _time(v, p, exact)
        if impl is ops:
            return list(ops.interpolant(v["x"], v["noise"], t, schedule, outputs=p["outputs"], **kw))
        return list(ref.interpolant(v["x"], v["noise"], t, schedule, **kw))
    if case.op == "velocity_mse":
        t, schedule, kw = _time(v, p, exact)
        return [impl.velocity_mse(v["pred"], v["x"], v["noise"], t, schedule, weight=v.get("weight"),
                                  reduction=p["reduction"], **kw)]
    if case.op == "mse":
        return [impl.mse(v["pred"], v["target"])]
    shift, scale, gate = _modulation(v)
    if case.op == "gated_residual":
        return [impl.gated_residual(v["x"], v["h"], gate)]
    eps, out_dtype = p["eps"], p["out_dtype"]
    if impl is ops or not exact:
        if case.op == "ln_modulate":
            return [impl.ln_modulate(v["x"], shift, scale, eps, out_dtype)]
        return list(impl.gated_residual_ln_modulate(v["x"], v["h"], gate, shift, scale, eps, out_dtype))
    # float64: rows shifted by their first element, and y from x_out as stored
    x_out = v["x"] if case.op == "ln_modulate" else ref.gated_residual(v["x"], v["h"], gate)
    stored = x_out if case.op == "ln_modulate" else _StoredAs.apply(x_out, case.specs["x"].dtype)
    y = ref.ln_modulate(stored - stored[..., :1].detach(), shift, scale, eps)
    return [y] if case.op == "ln_modulate" else [x_out, y]


def prepare_near(case, bases, gen):
    """pred (or target) a relative 1e-3 step from the target the loss compares it with."""
    if not case.params.get("near"):
        return
    views = {n: view_of(s.layout, bases[n].double(), s.shape) for n, s in case.specs.items()}
    if case.op == "mse":
        name, target = "target", views["pred"]
    else:
        t, schedule, kw = _time(views, case.params, exact=True)
        name, target = "pred", ref.interpolant(views["x"], views["noise"], t, schedule, **kw)[1]
    spec = case.specs[name]
    near = target + 1e-3 * (1 + target.abs()) * torch.randn(target.shape, generator=gen, dtype=torch.float64)
    view_of(spec.layout, bases[name], spec.shape).copy_(near.to(spec.dtype))


def run(case, impl, bases, upstream, dtype=None, jitter=None):
    """Outputs, then the gradient of every op argument that needs one, with
    the bases in their own dtypes or converted to `dtype`. jitter = (generator,
    eps): each value then times 1 + u eps, u uniform in [-1, 1)."""
    leaves = {}
    for n, b in bases.items():
        leaf = b.detach().to(dtype or b.dtype)
        if jitter is not None:
            u = torch.rand(leaf.shape, generator=jitter[0], dtype=torch.float64).to(leaf.device)
            leaf = leaf * (1 + (2 * u - 1) * jitter[1])
        leaves[n] = leaf.requires_grad_(case.specs[n].grad)
    views = {n: view_of(case.specs[n].layout, leaf, case.specs[n].shape) for n, leaf in leaves.items()}
    outputs = call(case, impl, views, exact=dtype is not None)
    terms = [(o * u.to(o.dtype)).sum() for o, u in zip(outputs, upstream) if u is not None]
    targets = [v for n in grad_names(case) for v in _flat(views[n])]
    loss = sum(terms) if terms else None
    if loss is None or not loss.requires_grad:  # nothing used depends on the targets
        return outputs, [torch.zeros_like(v) for v in targets], views
    return outputs, list(torch.autograd.grad(loss, targets, allow_unused=True, materialize_grads=True)), views


def _flat(view):
    return list(view) if isinstance(view, tuple) else [view]


def grad_names(case):
    return [n for n, s in case.specs.items() if s.grad]


def _samples(v):
    """Which samples of a [B, ...] tensor hold a non-finite value."""
    finite = torch.isfinite(v.detach())
    return ~(finite.flatten(1).all(dim=1) if finite.dim() > 1 else finite)


def skipped_samples(case, views):
    """Samples whose gradients are not compared, by gradient, from the float64
    views: what the kernels' 0 x inf conventions decide differently from
    autograd (see the module docstring and the xfail tests at the end)."""
    if case.op not in ("interpolant", "velocity_mse"):
        return {}
    t, schedule, kw = _time(views, case.params, exact=True)
    coefficients = torch.stack(kw.get("coefficients") or ref.schedule_coefficients(t, schedule), dim=1)
    bad_coefficients = ~torch.isfinite(coefficients.detach())
    skip = {}
    if not case.params["coefficients"]:  # dt: the chain rule through (a, b, a', b') on samples with inf or NaN
        degenerate = bad_coefficients.any(dim=1)
        for name in ("x", "noise", "pred", "weight"):
            if name in views:
                degenerate |= _samples(views[name])
        skip["t"] = degenerate
    return skip


def check(case, device):
    gen = torch.Generator().manual_seed(case.seed)
    bases = {n: materialize(s, gen) for n, s in case.specs.items()}
    prepare_near(case, bases, gen)
    bases = {n: b.to(device) for n, b in bases.items()}
    upstream = [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(device) if use else None
                for (shape, dtype), use in zip(case.outputs, case.used)]
    fused, eager, exact = (run(case, impl, bases, upstream, dtype)
                           for impl, dtype in ((ops, None), (ref, None), (ref, torch.float64)))
    dtypes = {s.dtype for s in case.specs.values()} | {dtype for _, dtype in case.outputs}
    # What the op's compute precision allows: the reference on inputs off by a few roundings at it (float64
    # eager is the reference itself, and eager float16 can overflow where the op computes in float32).
    eps = 4 * torch.finfo(acc_dtype(*dtypes)).eps
    eagers = [eager, run(case, ref, bases, upstream, torch.float64, jitter=(gen, eps))]
    atol = max(ATOL[d] for d in dtypes)
    for i, (shape, dtype) in enumerate(case.outputs):
        f, what = fused[0][i], f"{case.op} output {i}"
        assert f.dtype == dtype, f"{what}: dtype {f.dtype}, expected {dtype}"
        if shape is None:  # masked off: an empty tensor
            assert f.shape == (0,), f"{what}: masked off, but shape {tuple(f.shape)}"
            continue
        assert f.device.type == device and f.shape == shape, f"{what}: {f.device} {tuple(f.shape)}"
        assert_matches_ref(f, [e[0][i] for e in eagers], exact[0][i], atol, what)
    skip = skipped_samples(case, exact[2])
    names = [n for n in grad_names(case) for _ in _flat(exact[2][n])]
    for k, (name, f) in enumerate(zip(names, fused[1])):
        what, want = f"{case.op} d{name}", case.specs[name].dtype
        assert f.dtype == want, f"{what}: dtype {f.dtype}, expected {want}"
        lows, r = [e[1][k] for e in eagers], exact[1][k]
        if name in skip:
            keep = ~skip[name].to(f.device)
            f, r, lows = f[keep], r[keep], [low[keep] for low in lows]
        assert_matches_ref(f, lows, r, atol, what)


# -------------------------------------------------------------------- tests


@fuzz("interpolant")
@given(case=interpolant_cases())
def test_interpolant(device, case):
    check(case, device)


@fuzz("velocity_mse")
@given(case=velocity_mse_cases())
def test_velocity_mse(device, case):
    check(case, device)


@fuzz("mse")
@given(case=mse_cases())
def test_mse(device, case):
    check(case, device)


@fuzz("ln_modulate")
@given(case=adaln_cases("ln_modulate"))
def test_ln_modulate(device, case):
    check(case, device)


@fuzz("gated_residual_ln_modulate")
@given(case=adaln_cases("gated_residual_ln_modulate"))
def test_gated_residual_ln_modulate(device, case):
    check(case, device)


@fuzz("gated_residual")
@given(case=adaln_cases("gated_residual"))
def test_gated_residual(device, case):
    check(case, device)


# ------------------------------------------------------- double backward
#
# test_interpolant_ops.py and test_adaln_ops.py refuse a second derivative of
# interpolant (x_t, built-in schedule), velocity_mse (t), mse, ln_modulate,
# gated_residual_ln_modulate (y) and gated_residual. The other routes, each a
# loss and the inputs whose first derivative a fused backward op computes:


def _interpolant_route(outputs, coefficients):
    def route(x, noise, time):
        t = None if coefficients else time[0]
        xt, ut = ops.interpolant(x, noise, t, "vp", coefficients=time if coefficients else None, outputs=outputs)
        return sum(o.square().sum() for o, on in zip((xt, ut), outputs) if on)
    return route


def _velocity_mse_route(x, noise, time):
    return ops.velocity_mse(noise.flip(0) * x, x, noise, coefficients=time)


def _x_out_route(x, h, modulation):
    """Only x_out used: the backward passes dx through and makes dh, dgate with gated_residual_backward."""
    gate, shift, scale = modulation
    return ops.gated_residual_ln_modulate(x, h, gate, shift, scale)[0].square().sum()


DOUBLE_BACKWARD = {
    **{f"interpolant-{'xt' * o[0]}{'ut' * o[1]}-{'coefficients' if c else 't'}": _interpolant_route(o, c)
       for o in [(True, False), (False, True), (True, True)] for c in (False, True)},
    "velocity_mse-coefficients": _velocity_mse_route,
    "gated_residual_ln_modulate-x_out": _x_out_route,
}


@pytest.mark.parametrize("route", list(DOUBLE_BACKWARD))
def test_double_backward_refused(device, route):
    """Differentiating a first derivative made by a fused backward op (of x,
    noise, t, a coefficient, h or the gate) raises, never a silently wrong number."""
    x, noise = (torch.randn(4, 8, device=device, requires_grad=True) for _ in range(2))
    if route.startswith("gated"):  # x passes through; (h, gate) come from gated_residual_backward
        time = torch.randn(4, 48, device=device, requires_grad=True).chunk(6, dim=1)[:3]
        inputs, refused = [x, noise, *time], [noise, time[0]]
    else:
        count = 4 if "coefficients" in route else 1
        time = [(0.2 + 0.6 * torch.rand(4, device=device)).requires_grad_() for _ in range(count)]
        inputs = refused = [x, noise, *time]
    out = DOUBLE_BACKWARD[route](x, noise, list(time))
    firsts = dict(zip(map(id, inputs), torch.autograd.grad(out, inputs, create_graph=True, allow_unused=True)))
    checked = 0
    for v in refused:
        g = firsts[id(v)]
        if g is None:  # a coefficient the used outputs do not depend on
            continue
        with pytest.raises(RuntimeError, match="second-order gradients through the fused op are not supported"):
            torch.autograd.grad(g.sum(), inputs, allow_unused=True, retain_graph=True)
        checked += 1
    assert checked >= 2


# ------------------------------------------------------- 0 x inf in backward
#
# Found by this suite: the interpolant backward took the gradient of an unused
# output as 0 and multiplied it by an infinite coefficient (NaN), and the t
# gradients multiplied a zero a'' or b'' by an infinite sum. Fixed in the
# kernels (used_coef and times_sum in interpolant_math.h).


@pytest.mark.parametrize("outputs", [(True, False), (True, True)], ids=["masked", "unused"])
def test_vp_at_t0_unused_velocity_gives_no_nan(device, outputs):
    x = torch.tensor([[1.0, 2.0]], device=device, requires_grad=True)
    noise = torch.tensor([[3.0, -1.0]], device=device, requires_grad=True)
    xt, _ = ops.interpolant(x, noise, torch.zeros(1, device=device), "vp", outputs=outputs)
    dx, dnoise = torch.autograd.grad(xt.sum(), [x, noise])
    assert torch.equal(dx, torch.ones_like(x)) and torch.equal(dnoise, torch.zeros_like(noise))


def test_infinite_coefficient_of_unused_output(device):
    x = torch.tensor([[1.0, 2.0]], device=device, requires_grad=True)
    noise = torch.tensor([[3.0, -1.0]], device=device, requires_grad=True)
    alpha, beta, d_alpha, d_beta = (torch.tensor([v], device=device) for v in (math.inf, 0.5, -1.0, 1.0))
    _, ut = ops.interpolant(x, noise, coefficients=(alpha, beta, d_alpha, d_beta), outputs=(False, True))
    dx, dnoise = torch.autograd.grad(ut.sum(), [x, noise])
    assert torch.equal(dx, -torch.ones_like(x)) and torch.equal(dnoise, torch.ones_like(noise))


def test_linear_dt_of_infinite_loss_is_zero(device):
    pred = torch.tensor([[math.inf, 0.0]], device=device)
    x, noise = torch.tensor([[1.0, 2.0]], device=device), torch.tensor([[3.0, -1.0]], device=device)
    t = torch.tensor([0.5], device=device, requires_grad=True)
    loss = ops.velocity_mse(pred, x, noise, t, "linear")
    assert loss.item() == math.inf
    dt, = torch.autograd.grad(loss, [t])
    assert torch.equal(dt, torch.zeros_like(t))
