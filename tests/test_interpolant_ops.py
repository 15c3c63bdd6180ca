"""The interpolant, velocity-MSE and MSE ops against their pure-PyTorch
references: values and gradients, dtypes, shapes, strides, gradcheck, opcheck,
torch.compile, determinism and bad input."""

import pytest
import torch
from conftest import ATOL, DTYPES
from helpers import assert_bitwise_reproducible, assert_close_to_ref, expect_error, leaves, rand_time, randn

import sit_ext
from sit_ext import ops
from sit_ext import reference as ref

SHAPES = [(8, 1), (8, 7), (8, 1152), (4, 3, 8, 8), (3, 400_000)]  # the last: 1.2e6 elements
SCHEDULES = ["linear", "cosine", "vp", "coefficients"]


def time_inputs(schedule, batch, device, strided):
    """(t, schedule name, coefficients) for a built-in schedule, or random
    per-sample coefficient vectors for the custom path."""
    if schedule != "coefficients":
        return rand_time(batch, device, strided), schedule, None
    return None, "linear", [rand_time(batch, device, strided) * 2 - 1 for _ in range(4)]


def time_leaves(t, coefficients, dtype=None):
    """The time inputs as fresh grad-requiring leaves (in dtype, if given)."""
    if coefficients is None:
        return leaves(t, dtype=dtype)[0], None
    return None, leaves(*coefficients, dtype=dtype)


def grad_targets(t, coefficients):
    return [t] if coefficients is None else list(coefficients)


def run_interpolant(fn, x, noise, t, schedule, coefficients, gx, gu):
    xt, ut = fn(x, noise, t, schedule, coefficients=coefficients)
    inputs = [x, noise, *grad_targets(t, coefficients)]
    grads = torch.autograd.grad((xt * gx).sum() + (ut * gu).sum(), inputs, allow_unused=True,
                                materialize_grads=True)
    return [xt, ut, *grads]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_interpolant_matches_reference(device, shape, dtype, schedule, strided):
    batch = shape[0]
    x, noise = randn(shape, dtype, device, strided), randn(shape, dtype, device, strided)
    gx, gu = randn(shape, dtype, device), randn(shape, dtype, device)
    t, name, coefficients = time_inputs(schedule, batch, device, strided)

    def run(fn, dtype_=None):
        xl, nl = leaves(x, noise, dtype=dtype_)
        tl, cl = time_leaves(t, coefficients, dtype=torch.float64 if dtype_ == torch.float64 else None)
        g = [v.to(dtype_) if dtype_ else v for v in (gx, gu)]
        return run_interpolant(fn, xl, nl, tl, name, cl, *g)

    fused = run(ops.interpolant)
    eager = run(ref.interpolant, dtype)
    exact = run(ref.interpolant, torch.float64)
    names = ["x_t", "u_t", "dx", "dnoise"] + (["dt"] if coefficients is None else ["da", "db", "dda", "ddb"])
    for what, f, e, r in zip(names, fused, eager, exact):
        assert f.dtype == e.dtype, what
        assert_close_to_ref(f, e, r, ATOL[dtype], what)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_velocity_mse_matches_reference(device, shape, dtype, schedule, strided):
    batch = shape[0]
    pred, x, noise = (randn(shape, dtype, device, strided) for _ in range(3))
    t, name, coefficients = time_inputs(schedule, batch, device, strided)
    weight = rand_time(batch, device)
    upstream = torch.rand(batch, device=device, dtype=torch.float32)

    def run(fn, dtype_=None):
        pl, xl, nl = leaves(pred, x, noise, dtype=dtype_)
        f64 = torch.float64 if dtype_ == torch.float64 else None
        tl, cl = time_leaves(t, coefficients, dtype=f64)
        wl = leaves(weight, dtype=f64)[0]
        loss = fn(pl, xl, nl, tl, name, coefficients=cl, weight=wl, reduction="none")
        inputs = [pl, xl, nl, wl, *grad_targets(tl, cl)]
        return [loss, *torch.autograd.grad((loss * upstream.to(loss.dtype)).sum(), inputs,
                                            allow_unused=True, materialize_grads=True)]

    fused = run(ops.velocity_mse)
    eager = run(ref.velocity_mse, dtype)
    exact = run(ref.velocity_mse, torch.float64)
    assert fused[0].dtype == torch.float32 and fused[0].shape == (batch,)
    names = ["loss", "dpred", "dx", "dnoise", "dweight", "dt..."]
    for i, (f, e, r) in enumerate(zip(fused, eager, exact)):
        assert_close_to_ref(f, e, r, ATOL[dtype], names[min(i, 5)])


@pytest.mark.parametrize("shape", [(1,), (7, 3), (8, 1152), (3, 400_000)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_sit_loss_matches_reference(device, shape, dtype, strided):
    pred, target = randn(shape, dtype, device, strided), randn(shape, dtype, device, strided)

    def run(fn, dtype_=None):
        pl, tl = leaves(pred, target, dtype=dtype_)
        loss = fn(pl, tl)
        return [loss, *torch.autograd.grad(loss * 3.0, [pl, tl])]

    fused, eager, exact = run(sit_ext.sit_loss), run(ref.mse, dtype), run(ref.mse, torch.float64)
    assert fused[0].dtype == torch.float32 and fused[0].dim() == 0
    for what, f, e, r in zip(["loss", "dpred", "dtarget"], fused, eager, exact):
        assert_close_to_ref(f, e, r, ATOL[dtype], what)


# (pred, x) dtypes: a model under autocast predicts in bfloat16 while x stays float32.
LOSS_PAIRS = [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.float32, torch.bfloat16),
              (torch.bfloat16, torch.float16), (torch.float64, torch.float32), (torch.float32, torch.float64)]


def _loss_dtype(*dtypes):
    return torch.float64 if torch.float64 in dtypes else torch.float32


@pytest.mark.parametrize("pred_dtype, x_dtype", LOSS_PAIRS, ids=str)
@pytest.mark.parametrize("shape", [(8, 7), (4, 3, 8, 8), (2, 4100)], ids=str)
def test_velocity_mse_mixed_dtypes(device, pred_dtype, x_dtype, shape):
    """pred in a dtype of its own is read as it is; the loss is float32 (float64
    if either side is), and each gradient comes back in its input's dtype."""
    pred = torch.randn(shape, dtype=pred_dtype, device=device)
    x, noise = (torch.randn(shape, dtype=x_dtype, device=device) for _ in range(2))
    t = rand_time(shape[0], device)
    upstream = torch.rand(shape[0], device=device)

    def run(fn, dtype_=None):
        pl, xl, nl, tl = leaves(pred, x, noise, t, dtype=dtype_)
        loss = fn(pl, xl, nl, tl, "cosine", reduction="none")
        return [loss, *torch.autograd.grad((loss * upstream.to(loss.dtype)).sum(), [pl, xl, nl, tl])]

    fused, eager, exact = run(ops.velocity_mse), run(ref.velocity_mse), run(ref.velocity_mse, torch.float64)
    assert [f.dtype for f in fused] == [_loss_dtype(pred_dtype, x_dtype), pred_dtype, x_dtype, x_dtype, torch.float32]
    atol = max(ATOL[pred_dtype], ATOL[x_dtype])
    for what, f, e, r in zip(["loss", "dpred", "dx", "dnoise", "dt"], fused, eager, exact):
        assert_close_to_ref(f, e, r, atol, what)


@pytest.mark.parametrize("pred_dtype, target_dtype", LOSS_PAIRS, ids=str)
@pytest.mark.parametrize("shape", [(7, 3), (2, 4100)], ids=str)
def test_sit_loss_mixed_dtypes(device, pred_dtype, target_dtype, shape):
    pred = torch.randn(shape, dtype=pred_dtype, device=device)
    target = torch.randn(shape, dtype=target_dtype, device=device)

    def run(fn, dtype_=None):
        pl, tl = leaves(pred, target, dtype=dtype_)
        loss = fn(pl, tl)
        return [loss, *torch.autograd.grad(loss * 3.0, [pl, tl])]

    fused, eager, exact = run(sit_ext.sit_loss), run(ref.mse), run(ref.mse, torch.float64)
    assert [f.dtype for f in fused] == [_loss_dtype(pred_dtype, target_dtype), pred_dtype, target_dtype]
    atol = max(ATOL[pred_dtype], ATOL[target_dtype])
    for what, f, e, r in zip(["loss", "dpred", "dtarget"], fused, eager, exact):
        assert_close_to_ref(f, e, r, atol, what)


@pytest.mark.parametrize("coef_dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_half_precision_coefficients_under_autocast(device, coef_dtype):
    """Coefficient vectors in any float dtype, under bfloat16 autocast: the same
    values as without it (the [B, 4] table's torch.stack failed inside autocast
    for float16 vectors), gradients in the vectors' dtype."""
    pred, x, noise = (torch.randn(4, 9, device=device) for _ in range(3))
    coefficients = [torch.rand(4, device=device).to(coef_dtype).requires_grad_() for _ in range(4)]
    results = []
    for enabled in (True, False):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=enabled):
            x_t, u_t = ops.interpolant(x, noise, coefficients=coefficients)
            loss = ops.velocity_mse(pred, x, noise, coefficients=coefficients)
        grads = torch.autograd.grad(x_t.sum() + u_t.sum() + loss, coefficients)
        assert all(g.dtype == coef_dtype for g in grads)
        results.append((x_t, u_t, loss, *grads))
    for with_autocast, without in zip(*results):
        torch.testing.assert_close(with_autocast, without, rtol=0, atol=0)


@pytest.mark.parametrize("mean", [True, False], ids=["mean", "none"])
def test_velocity_mse_reductions(device, mean):
    x, noise, pred = (torch.randn(6, 5, device=device) for _ in range(3))
    t = torch.rand(6, device=device)
    per_sample = ops.velocity_mse(pred, x, noise, t, reduction="none")
    expected = ref.velocity_mse(pred, x, noise, t, reduction="none")
    torch.testing.assert_close(per_sample, expected)
    if mean:
        torch.testing.assert_close(ops.velocity_mse(pred, x, noise, t), expected.mean())


def test_seed_functional_api(device):
    x, noise = torch.randn(5, 2, 3, device=device), torch.randn(5, 2, 3, device=device)
    t = torch.rand(5, device=device)
    tb = t.view(5, 1, 1)
    torch.testing.assert_close(sit_ext.linear_interpolant(x, noise, t), (1 - tb) * x + tb * noise)
    torch.testing.assert_close(sit_ext.linear_velocity(x, noise), noise - x)
    h = torch.pi / 2
    torch.testing.assert_close(sit_ext.cosine_interpolant(x, noise, t),
                               torch.cos(h * tb) * x + torch.sin(h * tb) * noise)
    torch.testing.assert_close(sit_ext.cosine_velocity(x, noise, t),
                               h * (torch.cos(h * tb) * noise - torch.sin(h * tb) * x))
    torch.testing.assert_close(sit_ext.sit_loss(x, noise), ((x - noise) ** 2).mean())


def test_sample_interpolant_time(device):
    def draw(seed, **kw):
        return sit_ext.sample_interpolant_time(1000, generator=torch.Generator(device).manual_seed(seed),
                                               device=device, **kw)

    t1 = draw(3)
    assert t1.shape == (1000,) and t1.dtype == torch.float32 and t1.device.type == device
    assert 0 <= t1.min() and t1.max() < 1 and abs(t1.mean().item() - 0.5) < 0.05
    assert torch.equal(t1, draw(3)) and not torch.equal(t1, draw(4))
    assert draw(3, dtype=torch.float64).dtype == torch.float64
    assert sit_ext.sample_interpolant_time(0, device=device).shape == (0,)


# ------------------------------------------------------------------ gradcheck


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_gradcheck_float64(device, schedule):
    x, noise, pred = (torch.randn(3, 2, 5, dtype=torch.float64, device=device, requires_grad=True)
                      for _ in range(3))
    t, name, coefficients = time_inputs(schedule, 3, device, strided=False)
    t, coefficients = time_leaves(None if t is None else t.double(),
                                  None if coefficients is None else [c.double() for c in coefficients])
    time = grad_targets(t, coefficients)

    def split(time_args):
        return (time_args[0], None) if coefficients is None else (None, list(time_args))

    def interp(x, noise, *time_args):
        tt, cc = split(time_args)
        return ops.interpolant(x, noise, tt, name, coefficients=cc)

    def vmse(pred, x, noise, *time_args):
        tt, cc = split(time_args)
        return ops.velocity_mse(pred, x, noise, tt, name, coefficients=cc, reduction="none")

    assert torch.autograd.gradcheck(interp, (x, noise, *time))
    assert torch.autograd.gradcheck(vmse, (pred, x, noise, *time))
    assert torch.autograd.gradcheck(ops.mse, (pred, x))


# -------------------------------------------------------------------- opcheck


def opcheck_cases(device):
    x, noise, pred = (torch.randn(4, 3, 5, device=device) for _ in range(3))
    t = torch.rand(4, device=device)
    coef = torch.randn(4, 4, device=device)
    g = torch.randn(4, 3, 5, device=device)
    g4 = torch.rand(4, device=device)
    s = torch.rand((), device=device)
    need = lambda *ts: [v.requires_grad_() for v in ts]  # noqa: E731
    ops_ = torch.ops.sit_ext
    return [
        (ops_.interpolant.default, (*need(x.clone(), noise.clone(), t.clone()), 1, [True, True])),
        (ops_.interpolant.default, (x, noise, coef.clone().requires_grad_(), 3, [True, False])),
        (ops_.interpolant_backward.default, (g, g, x, noise, t, 2, [True, True, True])),
        (ops_.interpolant_backward.default, (None, g, x, noise, coef, 3, [False, True, True])),
        (ops_.velocity_mse.default, (*need(pred.clone(), x.clone(), noise.clone(), t.clone()), 0)),
        (ops_.velocity_mse_backward.default, (g4, pred, x, noise, t, 1, [True, True, True, True])),
        (ops_.velocity_mse_backward.default, (g4, pred, x, noise, coef, 3, [True, False, False, True])),
        (ops_.mse.default, tuple(need(pred.clone(), x.clone()))),
        (ops_.mse_backward.default, (s, pred, x, [True, True])),
        # autocast dtypes: a bfloat16 prediction against float32 data
        (ops_.velocity_mse.default, (*need(pred.bfloat16(), x.clone(), noise.clone(), t.clone()), 1)),
        (ops_.velocity_mse_backward.default, (g4, pred.bfloat16(), x, noise, t, 2, [True, True, True, True])),
        (ops_.mse.default, tuple(need(pred.bfloat16(), x.clone()))),
        (ops_.mse_backward.default, (s, pred.bfloat16(), x.double(), [True, True])),
    ]


def test_opcheck(device):
    for op, args in opcheck_cases(device):
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph(device):
    """Forward traced with fullgraph=True; backward compiled by AOTAutograd."""
    torch._dynamo.reset()

    def step(pred, x, noise, t):
        xt, ut = ops.interpolant(x, noise, t, "cosine")
        low = (pred * xt).bfloat16()  # a bfloat16 prediction, as under autocast
        return ops.velocity_mse(pred * xt, x, noise, t, "cosine") + sit_ext.sit_loss(pred, ut) + ops.mse(low, ut)

    def loss_and_grads(fn):
        inputs = [a.detach().clone().requires_grad_(i in (0, 3)) for i, a in enumerate(args)]
        loss = fn(*inputs)
        loss.backward()
        return loss, inputs[0].grad, inputs[3].grad

    args = [torch.randn(4, 6, 8, device=device), torch.randn(4, 6, 8, device=device),
            torch.randn(4, 6, 8, device=device), torch.rand(4, device=device)]
    got = loss_and_grads(torch.compile(step, fullgraph=True))
    want = loss_and_grads(step)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- determinism


def test_backward_is_deterministic(device):
    """The per-sample reductions (dt, dcoefficients) have a fixed order: same
    bits on every run, for any number of CPU threads."""
    shape = (4, 256, 1152)
    pred, x, noise = (torch.randn(shape, device=device) for _ in range(3))
    t = rand_time(4, device).requires_grad_()

    def grads():
        per_sample = ops.velocity_mse(pred, x, noise, t, "cosine", reduction="none")
        xt, ut = ops.interpolant(x, noise, t, "vp")
        dt_loss, = torch.autograd.grad(per_sample, [t], torch.ones_like(per_sample))
        dt_interp, = torch.autograd.grad([xt, ut], [t], [pred, noise])
        return per_sample.detach(), dt_loss, dt_interp, sit_ext.sit_loss(pred, x)

    assert_bitwise_reproducible(grads)


# ------------------------------------------------------------------ bad input


def test_bad_input(device):
    x, noise, pred = (torch.randn(4, 3, device=device) for _ in range(3))
    t = torch.rand(4, device=device)
    expect_error(lambda: ops.interpolant(x, torch.randn(4, 5, device=device), t), "noise", "shape")
    expect_error(lambda: ops.velocity_mse(torch.randn(4, 2, device=device), x, noise, t), "pred", "shape")
    expect_error(lambda: ops.interpolant(x, noise, torch.rand(3, device=device)), "t", "[4]")
    expect_error(lambda: ops.interpolant(x, noise, torch.rand(4, 1, device=device)), "t", "[4]")
    expect_error(lambda: ops.interpolant(x, noise.double(), t), "noise", "dtype")
    expect_error(lambda: ops.interpolant(x.int(), noise.int(), t), "x", "float")
    expect_error(lambda: ops.interpolant(x, noise, t > 0.5), "t", "float")
    expect_error(lambda: sit_ext.sit_loss(x.bool(), noise.bool()), "pred", "float")
    expect_error(lambda: sit_ext.sit_loss(x, noise[:, :2]), "target", "shape")
    expect_error(lambda: ops.interpolant(x, noise, t, "quadratic"), "unknown schedule", "quadratic")
    expect_error(lambda: ops.interpolant(x, noise, t, coefficients=[t, t, t]), "coefficients")
    expect_error(lambda: ops.interpolant(x, noise, coefficients=[t, t, t, t[:2]]), "d_beta", "[4]")
    expect_error(lambda: ops.velocity_mse(pred, x, noise, t, weight=t[:3]), "weight", "[4]")
    expect_error(lambda: ops.velocity_mse(pred, x, noise, t, reduction="sum"), "reduction")
    expect_error(lambda: ops.interpolant(torch.randn((), device=device), torch.randn((), device=device), t),
                 "x", "0-d")
    expect_error(lambda: torch.ops.sit_ext.interpolant(x, noise, t, 7, [True, True]), "schedule")
    other = "meta" if device == "cpu" else "cpu"
    expect_error(lambda: ops.interpolant(x, noise, t.to(other)), "t", other)
    expect_error(lambda: ops.velocity_mse(pred.to(other), x, noise, t), "pred", other)
    expect_error(lambda: sit_ext.sit_loss(x, noise.to(other)), "target", other)
    expect_error(lambda: sit_ext.sample_interpolant_time(-1), "batch_size")


def test_empty_batch(device):
    x = torch.randn(0, 3, 4, device=device, requires_grad=True)
    noise, pred = torch.randn(0, 3, 4, device=device), torch.randn(0, 3, 4, device=device)
    t = torch.rand(0, device=device, requires_grad=True)
    xt, ut = ops.interpolant(x, noise, t, "cosine")
    assert xt.shape == ut.shape == (0, 3, 4)
    per_sample = ops.velocity_mse(pred, x, noise, t, reduction="none")
    assert per_sample.shape == (0,)
    (xt.sum() + per_sample.sum()).backward()
    assert x.grad.shape == x.shape and t.grad.shape == (0,)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_graph_capture_and_replay():
    """The ops allocate through the caching allocator, launch on the current
    stream and never sync, so forward and backward can be captured and
    replayed with new inputs."""
    shape = (4, 64, 96)
    static = [torch.randn(shape, device="cuda") for _ in range(3)] + [torch.rand(4, device="cuda")]
    pred, x, noise, t = static
    pred.requires_grad_()

    def step():
        loss = ops.velocity_mse(pred, x, noise, t, "cosine") + sit_ext.sit_loss(
            pred, ops.interpolant(x, noise, t, "cosine")[0])
        grad, = torch.autograd.grad(loss, [pred])
        return loss.detach(), grad

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for _ in range(2):
        with torch.no_grad():
            for v in static:
                v.copy_(torch.randn_like(v) if v.dim() > 1 else torch.rand_like(v))
        graph.replay()
        torch.cuda.synchronize()
        want = step()
        torch.testing.assert_close(out[0], want[0])
        torch.testing.assert_close(out[1], want[1])


@pytest.mark.parametrize("op", ["interpolant", "velocity_mse", "mse"])
def test_double_backward_refused(device, op):
    """A second derivative through the fused ops raises, never a silently wrong number."""
    x, noise, pred = (torch.randn(4, 6, device=device, requires_grad=True) for _ in range(3))
    t = torch.rand(4, device=device)
    out = {"interpolant": lambda: ops.interpolant(x, noise, t, "cosine")[0].square().sum(),
           "velocity_mse": lambda: ops.velocity_mse(pred, x, noise, t),
           "mse": lambda: ops.mse(pred, x)}[op]()
    first, = torch.autograd.grad(out, x, create_graph=True)
    with pytest.raises(RuntimeError, match="second-order gradients"):
        first.sum().backward()


def test_unused_outputs_pass_no_nan(device):
    """A coefficient that no used output depends on gets no gradient: its
    infinite slope at t = 0 (d_beta = 1.5 sqrt(t) below, alpha = sqrt(t) for
    the velocity loss) must not meet a zero gradient and make NaN."""
    t = torch.tensor([0.0, 0.5, 1e-12, 0.3], device=device, requires_grad=True)
    x, noise, pred = (torch.randn(4, 6, device=device) for _ in range(3))
    xt, _ = ops.interpolant(x, noise, coefficients=(1 - t, t**1.5, -torch.ones_like(t), 1.5 * t.sqrt()),
                            outputs=(True, False))
    xt.sum().backward()
    assert torch.isfinite(t.grad).all()
    t.grad = None
    ops.velocity_mse(pred, x, noise, coefficients=(t.sqrt(), t, -torch.ones_like(t), 1 + t)).backward()
    assert torch.isfinite(t.grad).all()


def test_vp_holds_t_in_the_unit_interval(device):
    """Adaptive solvers probe t just outside [0, 1]; there a > 1 made b =
    sqrt(1 - a^2) NaN. The kernels hold t in [0, 1] as the reference does:
    values at the end, and no gradient to t outside."""
    t = torch.tensor([-0.005, -0.5, 0.0, 0.4, 1.0, 1.3], dtype=torch.float64, device=device)
    x, noise = (torch.randn(6, 5, dtype=torch.float64, device=device) for _ in range(2))
    fused_t, ref_t = (t.clone().requires_grad_(True) for _ in range(2))
    fused = ops.interpolant(x, noise, fused_t, "vp")
    want = ref.interpolant(x, noise, ref_t, "vp")
    assert torch.isfinite(fused[0]).all()  # u_t is infinite at t <= 0, where b' is, as in the reference
    for got, expected in zip(fused, want):
        torch.testing.assert_close(got, expected)
    inside = (t > 0) & (t < 1)  # at t = 0, b' is infinite: the gradient is checked inside the interval only
    (fused[0].sum() + fused[1].square().sum()).backward()
    (want[0].sum() + want[1].square().sum()).backward()
    torch.testing.assert_close(fused_t.grad[inside], ref_t.grad[inside])
    assert torch.equal(fused_t.grad[(t < 0) | (t > 1)], torch.zeros(3, dtype=torch.float64, device=device))


def test_vp_reference_is_accurate_near_t_zero():
    """The reference's float32 VP beta: sqrt(1 - alpha^2) lost 2.4% to
    cancellation at t = 1e-5 (the default train_eps), so unfused VP losses were
    5% off the fused kernels' there."""
    t = torch.tensor([1e-6, 1e-5, 1e-4, 1e-3, 0.5, 1.0])
    single, double = ref.schedule_coefficients(t, "vp"), ref.schedule_coefficients(t.double(), "vp")
    for got, want in zip(single, double):
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)


def test_vp_time_gradient_near_t_zero_is_finite_and_exact(device):
    """|x|, |noise| ~ 1e18 (float32) at t down to 1e-24: the t gradient is
    finite and matches float64. The kernels took b = sqrt(1 - a^2), which is 0
    for t below ~1e-16 (a rounds to 1 in double): b' and b'' were infinite and
    the gradient inf or NaN where it is up to ~1e35 (b'' grows as t^-1.5)."""
    gen = torch.Generator().manual_seed(0)
    t = torch.tensor([1e-24, 1e-20, 1e-12, 1e-7, 0.5, 1.0 - 2**-24])
    x, noise = (1e18 * torch.randn(len(t), 3, generator=gen) for _ in range(2))
    grads = [1e-18 * torch.randn(len(t), 3, generator=gen) for _ in range(2)]  # the products stay in range
    fused_t = t.to(device).requires_grad_()
    outputs = ops.interpolant(x.to(device), noise.to(device), fused_t, "vp")
    got, = torch.autograd.grad(outputs, [fused_t], [g.to(device) for g in grads])
    exact_t = t.double().requires_grad_()
    want, = torch.autograd.grad(ref.interpolant(x.double(), noise.double(), exact_t, "vp"), [exact_t],
                                [g.double() for g in grads])
    assert (want.abs() < torch.finfo(torch.float32).max).all()
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=0)
