"""The AdaLN-Zero ops (ln_modulate, gated_residual_ln_modulate, gated_residual)
against their pure-PyTorch references: values and all gradients, dtypes, D,
strided chunk(6) views, gradcheck, opcheck, torch.compile, determinism and bad
input."""

import pytest
import torch
from conftest import ATOL, DTYPES, LOW_PRECISION
from helpers import assert_bitwise_reproducible, assert_close_to_ref, expect_error, leaves

from sit_ext import ops
from sit_ext import reference as ref
from sit_ext.models import _fused_dtypes

# [B, T, D] and [B, D] shapes; D = 384, 768, 1024, 1152 are first-class, 1 and 7 are odd. On CUDA,
# 2050 (odd) and 5000 take the streamed backward, 9000 and 16384 the streamed forward as well.
SHAPES = [(2, 5, 1), (3, 4, 7), (2, 16, 384), (2, 8, 768), (5, 1024), (2, 8, 1152), (4, 256, 1152),
          (2, 3, 2050), (2, 3, 5000), (2, 2, 9000), (1, 2, 16384)]
# "+bias": gated_residual_ln_modulate with the Linear's bias folded in.
OPS = ["ln_modulate", "gated_residual_ln_modulate", "gated_residual_ln_modulate+bias", "gated_residual"]


def modulation(batch, dim, dtype, device, chunked):
    """(shift, scale, gate): the strided views chunk(6, dim=1) makes of one
    [B, 6D] tensor (as in a SiT block), or three contiguous [B, D] tensors."""
    if chunked:
        return torch.randn(batch, 6 * dim, dtype=dtype, device=device).chunk(6, dim=1)[:3]
    return [torch.randn(batch, dim, dtype=dtype, device=device) for _ in range(3)]


def run_op(impl, name, x, h, shift, scale, gate, bias, upstream, out_dtype=None):
    """Forward, then the gradients of every input, for one op."""
    if name == "ln_modulate":
        outputs, inputs = [impl.ln_modulate(x, shift, scale, out_dtype=out_dtype)], [x, shift, scale]
    elif name == "gated_residual":
        outputs, inputs = [impl.gated_residual(x, h, gate)], [x, h, gate]
    elif name == "gated_residual_ln_modulate+bias":
        outputs = list(impl.gated_residual_ln_modulate(x, h, gate, shift, scale, out_dtype=out_dtype, bias=bias))
        inputs = [x, h, gate, shift, scale, bias]
    else:
        outputs = list(impl.gated_residual_ln_modulate(x, h, gate, shift, scale, out_dtype=out_dtype))
        inputs = [x, h, gate, shift, scale]
    loss = sum((o * u.to(o.dtype)).sum() for o, u in zip(outputs, upstream))
    return outputs + list(torch.autograd.grad(loss, inputs))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "contiguous"])
def test_matches_reference(device, shape, dtype, name, chunked):
    x = torch.randn(shape, dtype=dtype, device=device)
    h = torch.randn(shape, dtype=dtype, device=device)
    shift, scale, gate = modulation(shape[0], shape[-1], dtype, device, chunked)
    bias = torch.randn(shape[-1], dtype=dtype, device=device)
    upstream = [torch.randn(shape, dtype=dtype, device=device) for _ in range(2)]

    def run(impl, dtype_=None):
        return run_op(impl, name, *leaves(x, h, shift, scale, gate, bias, dtype=dtype_), upstream)

    fused, eager, exact = run(ops), run(ref, dtype), run(ref, torch.float64)
    for i, (f, e, r) in enumerate(zip(fused, eager, exact)):
        assert f.dtype == dtype
        assert_close_to_ref(f, e, r, ATOL[dtype], f"{name} result {i}")


@pytest.mark.parametrize("shape", [(2, 5, 1), (3, 4, 7), (2, 16, 384), (5, 1024), (2, 33, 1152)], ids=str)
@pytest.mark.parametrize("low", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("name, y_in, bias_in", [
    (name, y_in, bias_in) for name in OPS for y_in in ("x", "low")
    for bias_in in (("x", "low") if name.endswith("+bias") else ("x",))
    if name != "gated_residual" or y_in == "x"])  # gated_residual has no y
def test_mixed_dtypes(device, shape, low, y_in, name, bias_in):
    """The autocast configuration: float32 x, h and the modulation vectors in
    bfloat16/float16 (Linear outputs), y in x's dtype or theirs, the folded
    bias in either (autocast leaves the float32 parameter as it is). Each
    input is read in its own dtype; x_out stays float32; every gradient comes
    back in its input's dtype, within the bound of eager PyTorch on the same mix."""
    out_dtype = torch.float32 if y_in == "x" else low
    bias_dtype = torch.float32 if bias_in == "x" else low
    x = torch.randn(shape, device=device)
    h = torch.randn(shape, dtype=low, device=device)
    shift, scale, gate = modulation(shape[0], shape[-1], low, device, chunked=True)
    bias = torch.randn(shape[-1], dtype=bias_dtype, device=device)
    upstream = [torch.randn(shape, device=device) for _ in range(2)]

    def run(impl, dtype_=None):
        out = None if dtype_ else out_dtype
        return run_op(impl, name, *leaves(x, h, shift, scale, gate, bias, dtype=dtype_), upstream, out)

    fused, eager, exact = run(ops), run(ref), run(ref, torch.float64)
    grlm = [torch.float32, low, low, low, low]
    outputs = {"ln_modulate": [out_dtype], "gated_residual": [torch.float32]}.get(name, [torch.float32, out_dtype])
    inputs = {"ln_modulate": [torch.float32, low, low], "gated_residual": [torch.float32, low, low],
              "gated_residual_ln_modulate": grlm, "gated_residual_ln_modulate+bias": grlm + [bias_dtype]}[name]
    assert [f.dtype for f in fused] == outputs + inputs
    for i, (f, e, r) in enumerate(zip(fused, eager, exact)):
        assert_close_to_ref(f, e, r, ATOL[low], f"{name} result {i}")


def test_mixed_dtype_rules(device):
    """h and the modulation vectors share one dtype, x's or (with float32 x)
    a 16-bit one; y is written in x's or theirs."""
    x = torch.randn(2, 4, 8, device=device)
    h = torch.randn(2, 4, 8, device=device, dtype=torch.bfloat16)
    shift, scale, gate = modulation(2, 8, torch.bfloat16, device, chunked=True)
    expect_error(lambda: ops.gated_residual_ln_modulate(x, h, gate.float(), shift, scale), "gate", "dtype of h")
    expect_error(lambda: ops.ln_modulate(x, shift, scale.half()), "scale", "BFloat16")
    expect_error(lambda: ops.ln_modulate(x.double(), shift, scale), "shift", "float32 x")
    expect_error(lambda: ops.ln_modulate(x.bfloat16(), shift.float(), scale.float()), "shift", "x's dtype")
    expect_error(lambda: ops.ln_modulate(x, shift, scale, out_dtype=torch.float16), "out_dtype")
    expect_error(lambda: ops.gated_residual_ln_modulate(x, h, gate, shift, scale, out_dtype=torch.float64),
                 "out_dtype")
    y, mean, rstd = torch.ops.sit_ext.ln_modulate(x, shift, scale, 1e-6, torch.bfloat16)
    expect_error(lambda: torch.ops.sit_ext.ln_modulate_backward(y.half(), x, scale, mean, rstd, [True] * 3),
                 "grad_y")


def test_strided_x(device):
    """A non-contiguous x (and h) works: it is read through a contiguous copy."""
    x = torch.randn(2, 16, 2 * 96, device=device)[..., ::2]
    h = torch.randn(2, 16, 2 * 96, device=device)[..., ::2]
    shift, scale, gate = modulation(2, 96, torch.float32, device, chunked=True)
    for got, want in zip(ops.gated_residual_ln_modulate(x, h, gate, shift, scale),
                         ref.gated_residual_ln_modulate(x, h, gate, shift, scale)):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(ops.ln_modulate(x, shift, scale), ref.ln_modulate(x, shift, scale))


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_unused_outputs(device, with_bias):
    """Gradients flow when only one output of gated_residual_ln_modulate is used."""
    x, h = (torch.randn(2, 4, 16, device=device, requires_grad=True) for _ in range(2))
    params = torch.randn(2, 96, device=device, requires_grad=True)
    bias = torch.randn(16, device=device, requires_grad=True)
    shift, scale, gate = params.chunk(6, dim=1)[:3]
    leaves_ = [x, h, params] + [bias] * with_bias
    kw = {"bias": bias} if with_bias else {}
    for pick in (0, 1):
        got = torch.autograd.grad(ops.gated_residual_ln_modulate(x, h, gate, shift, scale, **kw)[pick].square().sum(),
                                  leaves_)
        want = torch.autograd.grad(ref.gated_residual_ln_modulate(x, h, gate, shift, scale, **kw)[pick].square().sum(),
                                   leaves_)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


def test_gradcheck_float64(device):
    kw = dict(dtype=torch.float64, device=device, requires_grad=True)
    x, h = torch.randn(2, 3, 5, **kw), torch.randn(2, 3, 5, **kw)
    params = torch.randn(2, 30, **kw)

    def chunks(p):
        return p.chunk(6, dim=1)

    assert torch.autograd.gradcheck(lambda x, p: ops.ln_modulate(x, chunks(p)[0], chunks(p)[1]), (x, params))
    assert torch.autograd.gradcheck(
        lambda x, h, p: ops.gated_residual_ln_modulate(x, h, chunks(p)[2], chunks(p)[0], chunks(p)[1]),
        (x, h, params))
    assert torch.autograd.gradcheck(
        lambda x, h, p, b: ops.gated_residual_ln_modulate(x, h, chunks(p)[2], chunks(p)[0], chunks(p)[1], bias=b),
        (x, h, params, torch.randn(5, **kw)))
    assert torch.autograd.gradcheck(lambda x, h, p: ops.gated_residual(x, h, chunks(p)[5]), (x, h, params))
    x2, h2 = torch.randn(3, 4, **kw), torch.randn(3, 4, **kw)  # [B, D]
    p2 = torch.randn(3, 24, **kw)
    assert torch.autograd.gradcheck(
        lambda x, h, p: ops.gated_residual_ln_modulate(x, h, chunks(p)[2], chunks(p)[0], chunks(p)[1]),
        (x2, h2, p2))


def test_opcheck(device):
    x, h, dy = (torch.randn(2, 4, 8, device=device) for _ in range(3))
    shift, scale, gate = modulation(2, 8, torch.float32, device, chunked=True)
    y, mean, rstd = torch.ops.sit_ext.ln_modulate(x, shift, scale, 1e-6)
    x_out, _, mean2, rstd2 = torch.ops.sit_ext.gated_residual_ln_modulate(x, h, gate, shift, scale, 1e-6)
    bias = torch.randn(8, device=device)
    base = torch.randn(2, 48, device=device, requires_grad=True)
    cs, cc, cg = base.chunk(6, dim=1)[:3]
    grad_leaf = lambda t: t.clone().requires_grad_()  # noqa: E731
    cases = [
        (torch.ops.sit_ext.ln_modulate.default, (grad_leaf(x), cs, cc, 1e-6)),
        (torch.ops.sit_ext.ln_modulate_backward.default, (dy, x, scale, mean, rstd, [True, True, True])),
        (torch.ops.sit_ext.gated_residual_ln_modulate.default, (grad_leaf(x), grad_leaf(h), cg, cs, cc, 1e-5)),
        (torch.ops.sit_ext.gated_residual_ln_modulate_backward.default,
         (dy, dy, x_out, h, gate, scale, mean2, rstd2, [True] * 5 + [False])),
        (torch.ops.sit_ext.gated_residual_ln_modulate_backward.default,
         (None, dy, x_out, h, gate, scale, mean2, rstd2, [False, True, True, False, True, False])),
        (torch.ops.sit_ext.gated_residual_ln_modulate.default,
         (grad_leaf(x), grad_leaf(h), cg, cs, cc, 1e-5, None, grad_leaf(bias))),
        (torch.ops.sit_ext.gated_residual_ln_modulate_backward.default,
         (dy, dy, x_out, h, gate, scale, mean2, rstd2, [True] * 6, bias)),
        (torch.ops.sit_ext.gated_residual.default, (grad_leaf(x), grad_leaf(h), cg)),
        (torch.ops.sit_ext.gated_residual_backward.default, (dy, h, gate, [True, True])),
    ]
    # autocast dtypes: float32 x, bfloat16 h and modulation, y in bfloat16
    low = torch.randn(2, 48, device=device, dtype=torch.bfloat16, requires_grad=True)
    ls, lc, lg = low.chunk(6, dim=1)[:3]
    hb, dyb = h.bfloat16(), dy.bfloat16()
    with torch.no_grad():  # saved values, as the backward ops receive them
        y, mean, rstd = torch.ops.sit_ext.ln_modulate(x, ls, lc, 1e-6, torch.bfloat16)
        x_out, _, mean2, rstd2 = torch.ops.sit_ext.gated_residual_ln_modulate(x, hb, lg, ls, lc, 1e-6, torch.bfloat16)
    cases += [
        (torch.ops.sit_ext.ln_modulate.default, (grad_leaf(x), ls, lc, 1e-6, torch.bfloat16)),
        (torch.ops.sit_ext.ln_modulate_backward.default, (dyb, x, lc.detach(), mean, rstd, [True] * 3)),
        (torch.ops.sit_ext.gated_residual_ln_modulate.default, (grad_leaf(x), grad_leaf(hb), lg, ls, lc, 1e-6, None)),
        (torch.ops.sit_ext.gated_residual_ln_modulate_backward.default,
         (dy, dyb, x_out, hb, lg.detach(), lc.detach(), mean2, rstd2, [True] * 5 + [False])),
        # the float32 bias parameter beside bfloat16 h, as autocast leaves it
        (torch.ops.sit_ext.gated_residual_ln_modulate.default,
         (grad_leaf(x), grad_leaf(hb), lg, ls, lc, 1e-6, torch.bfloat16, grad_leaf(bias))),
        (torch.ops.sit_ext.gated_residual_ln_modulate_backward.default,
         (dy, dyb, x_out, hb, lg.detach(), lc.detach(), mean2, rstd2, [True] * 6, bias)),
        (torch.ops.sit_ext.gated_residual_ln_modulate_backward.default,
         (dy, dyb, x_out, hb, lg.detach(), lc.detach(), mean2, rstd2, [False] * 5 + [True], bias.bfloat16())),
        (torch.ops.sit_ext.gated_residual.default, (grad_leaf(x), grad_leaf(hb), lg)),
        (torch.ops.sit_ext.gated_residual_backward.default, (dy, hb, lg.detach(), [True, True])),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_torch_compile_fullgraph(device, autocast):
    """A SiT-style residual stack through the fused ops, compiled without graph
    breaks; under autocast, float32 x with bfloat16 Linear outputs, as the model runs."""
    torch._dynamo.reset()
    lin = torch.nn.Linear(32, 32).to(device)
    mod = torch.nn.Linear(16, 192).to(device)

    def stack(x, c):
        y_dtype, (s1, c1, g1, s2, c2, g2) = _fused_dtypes(x, mod(c).chunk(6, dim=1))
        y = ops.ln_modulate(x, s1, c1, out_dtype=y_dtype)
        x, y = ops.gated_residual_ln_modulate(x, lin(y), g1, s2, c2, out_dtype=y_dtype)
        x, y = ops.gated_residual_ln_modulate(x, torch.nn.functional.linear(y, lin.weight), g2, s1, c1,
                                              out_dtype=y_dtype, bias=lin.bias)  # bias folded
        return ops.gated_residual(x, lin(y), g2).square().mean()

    x, c = torch.randn(3, 10, 32, device=device), torch.randn(3, 16, device=device)

    def loss_and_grads(fn):
        xl, cl = x.clone().requires_grad_(), c.clone().requires_grad_()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = fn(xl, cl)
        loss.backward()
        return loss, xl.grad, cl.grad

    for got, want in zip(loss_and_grads(torch.compile(stack, fullgraph=True)), loss_and_grads(stack)):
        torch.testing.assert_close(got, want)


def test_backward_is_deterministic(device):
    """dshift, dscale, dgate and dbias are sums over T (and B) in a fixed order:
    the same bits on every run and for any number of CPU threads."""
    x, h, dy, dxo = (torch.randn(4, 256, 1152, device=device) for _ in range(4))
    shift, scale, gate = modulation(4, 1152, torch.float32, device, chunked=True)
    bias = torch.randn(1152, device=device)
    x_out, _, mean, rstd = torch.ops.sit_ext.gated_residual_ln_modulate(x, h, gate, shift, scale, 1e-6, None,
                                                                        bias)

    def grads():
        return torch.ops.sit_ext.gated_residual_ln_modulate_backward(
            dxo, dy, x_out, h, gate, scale, mean, rstd, [True] * 6, bias)

    assert_bitwise_reproducible(grads)


def test_bad_input(device):
    x, h = torch.randn(2, 4, 8, device=device), torch.randn(2, 4, 8, device=device)
    shift, scale, gate = modulation(2, 8, torch.float32, device, chunked=True)
    expect_error(lambda: ops.gated_residual_ln_modulate(x, h[:, :3], gate, shift, scale), "h", "shape")
    expect_error(lambda: ops.gated_residual(x, h, gate[:1]), "gate", "[2, 8]")
    expect_error(lambda: ops.ln_modulate(x, shift[:, :4], scale), "shift", "[2, 8]")
    expect_error(lambda: ops.ln_modulate(x, shift.double(), scale), "shift", "dtype")
    expect_error(lambda: ops.gated_residual(x, h.half(), gate), "h", "dtype")
    expect_error(lambda: ops.ln_modulate(x.int(), shift, scale), "x", "float")
    expect_error(lambda: ops.ln_modulate(x, shift, torch.randn(8, 2, device=device).t()), "scale", "inner stride")
    expect_error(lambda: ops.ln_modulate(x[0, 0], shift, scale), "x", "[B, T, D]")
    expect_error(lambda: ops.ln_modulate(x.unsqueeze(0), shift, scale), "x", "[B, T, D]")
    expect_error(lambda: ops.ln_modulate(x[..., :0], shift[:, :0], scale[:, :0]), "D >= 1")
    other = "meta" if device == "cpu" else "cpu"
    expect_error(lambda: ops.ln_modulate(x, shift.to(other), scale), "shift", other)
    expect_error(lambda: ops.gated_residual(x, h, gate.to(other)), "gate", other)
    bias = torch.randn(8, device=device)
    expect_error(lambda: ops.gated_residual_ln_modulate(x, h, gate, shift, scale, bias=bias[:4]), "bias", "[8]")
    expect_error(lambda: ops.gated_residual_ln_modulate(x, h, gate, shift, scale, bias=bias.double()),
                 "bias", "x's dtype")
    expect_error(lambda: ops.gated_residual_ln_modulate(x, h, gate, shift, scale, bias=bias.to(other)),
                 "bias", other)
    with pytest.raises(TypeError, match="bias must be a Tensor"):
        ops.gated_residual_ln_modulate(x, h, gate, shift, scale, bias=[0.0] * 8)
    x_out, _, mean, rstd = torch.ops.sit_ext.gated_residual_ln_modulate(x, h, gate, shift, scale, 1e-6)
    expect_error(lambda: torch.ops.sit_ext.gated_residual_ln_modulate_backward(
        None, x, x_out, h, gate, scale, mean, rstd, [False] * 5 + [True]), "output_mask[5]", "no bias")


@pytest.mark.parametrize("shape", [(0, 4, 8), (2, 0, 8), (0, 8)], ids=str)
def test_empty_batch(device, shape):
    """No rows: empty outputs, and per-sample gradients that are sums over nothing (zeros)."""
    x = torch.randn(shape, device=device, requires_grad=True)
    h = torch.randn(shape, device=device, requires_grad=True)
    params = torch.randn(shape[0], 48, device=device, requires_grad=True)
    bias = torch.randn(shape[-1], device=device, requires_grad=True)
    shift, scale, gate = params.chunk(6, dim=1)[:3]
    x_out, y = ops.gated_residual_ln_modulate(x, h, gate, shift, scale)
    y2 = ops.gated_residual_ln_modulate(x, h, gate, shift, scale, bias=bias)[1]
    out = ops.gated_residual(x_out, h, gate) + ops.ln_modulate(x, shift, scale) + y + y2
    assert out.shape == shape
    out.sum().backward()
    assert x.grad.shape == x.shape and params.grad.shape == params.shape
    assert torch.equal(params.grad, torch.zeros_like(params))
    assert torch.equal(bias.grad, torch.zeros_like(bias))


def test_offset_views(device):
    """Inputs that start one element into their buffer (no 16-byte alignment)
    take the single-element path and give the same numbers."""
    def offset(shape, dtype=torch.float32):
        n = torch.Size(shape).numel()
        return torch.randn(n + 1, device=device, dtype=dtype)[1:].view(shape)

    x, h = offset((2, 16, 96)), offset((2, 16, 96))
    params = offset((2, 6 * 96))
    shift, scale, gate = params.chunk(6, dim=1)[:3]
    for got, want in zip(ops.gated_residual_ln_modulate(x, h, gate, shift, scale),
                         ref.gated_residual_ln_modulate(x, h, gate, shift, scale)):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(ops.gated_residual(x, h, gate), ref.gated_residual(x, h, gate))


@pytest.mark.parametrize("name", OPS)
def test_double_backward_refused(device, name):
    """A second derivative through the fused ops raises, never a silently wrong number."""
    x, h = (torch.randn(2, 3, 8, device=device, requires_grad=True) for _ in range(2))
    shift, scale, gate = torch.randn(2, 48, device=device, requires_grad=True).chunk(6, dim=1)[:3]
    bias = torch.randn(8, device=device, requires_grad=True)
    out = {"ln_modulate": lambda: ops.ln_modulate(x, shift, scale),
           "gated_residual_ln_modulate": lambda: ops.gated_residual_ln_modulate(x, h, gate, shift, scale)[1],
           "gated_residual_ln_modulate+bias":
               lambda: ops.gated_residual_ln_modulate(x, h, gate, shift, scale, bias=bias)[1],
           "gated_residual": lambda: ops.gated_residual(x, h, gate)}[name]()
    # (gated_residual passes dx through unchanged; its backward op makes dh.)
    first, = torch.autograd.grad(out.square().sum(), h if name == "gated_residual" else x, create_graph=True)
    with pytest.raises(RuntimeError, match="second-order gradients"):
        first.sum().backward()


class _Shifted:
    """ln_modulate with the row's first element subtracted first: the same
    function of x (LayerNorm ignores a per-row constant), the same gradient,
    and in float64 an accurate reference also for float64 rows far from zero."""

    @staticmethod
    def ln_modulate(x, shift, scale, out_dtype=None):
        return ref.ln_modulate(x - x[..., :1], shift, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("mean, dim", [(1e4, 768), (1e3, 1152)], ids=["1e4", "1e3"])
def test_rows_with_a_large_mean(device, dtype, mean, dim):
    """LayerNorm of rows far from zero (mean + 1e-2 noise), values and
    gradients, stays within the bound of eager PyTorch at the same precision."""
    x = mean + 1e-2 * torch.randn(2, 8, dim, dtype=dtype, device=device)
    shift, scale, gate = modulation(2, dim, dtype, device, chunked=True)
    upstream = [torch.randn(2, 8, dim, dtype=dtype, device=device)]

    def run(impl, dtype_=None):
        return run_op(impl, "ln_modulate", *leaves(x, x, shift, scale, gate, dtype=dtype_), None, upstream)

    fused, eager, exact = run(ops), run(ref), run(_Shifted, torch.float64)
    for i, (f, e, r) in enumerate(zip(fused, eager, exact)):
        assert_close_to_ref(f, e, r, ATOL[dtype], f"ln_modulate result {i}")


def test_constant_rows_and_zero_eps(device):
    """A constant row normalises to exactly 0, so y is exactly shift; with
    eps = 0 it is NaN, as in eager PyTorch."""
    x = torch.full((2, 3, 40), 0.1, device=device)
    x[1] = -7.3
    shift, scale, _ = modulation(2, 40, torch.float32, device, chunked=True)
    y = ops.ln_modulate(x, shift, scale)
    assert torch.equal(y, shift[:, None].expand_as(y))
    assert torch.isnan(ops.ln_modulate(x, shift, scale, eps=0.0)).all()
    assert torch.isnan(ref.ln_modulate(x, shift, scale, eps=0.0)).all()


def test_float64_rows_far_from_zero_row_by_row(device):
    """float64 rows of D = 3 at mean 4.8e8 (std 1e-3 to 10), each row its own
    sample: y, dx, dshift and dscale of every row within the bound of eager
    PyTorch. Rounding the mean to float64 put single rows past that bound (y:
    5 rows of these 400, up to 1.15x the bound; eager rounds its mean too, by
    other amounts); the float64 kernels keep it in two parts, x0 + mean(x - x0)."""
    gen = torch.Generator().manual_seed(0)
    n, dim = 400, 3
    std = 10 ** (4 * torch.rand(n, 1, 1, generator=gen, dtype=torch.float64) - 3)
    x = 4.8e8 + std * torch.randn(n, 1, dim, generator=gen, dtype=torch.float64)
    shift, scale = (torch.randn(n, dim, generator=gen, dtype=torch.float64) for _ in range(2))
    upstream = torch.randn(n, 1, dim, generator=gen, dtype=torch.float64)

    def run(impl):
        xx, ss, cc = leaves(*(v.to(device) for v in (x, shift, scale)))
        y = impl.ln_modulate(xx, ss, cc)
        return [y, *torch.autograd.grad(y, [xx, ss, cc], upstream.to(device))]

    fused, eager, exact = run(ops), run(ref), run(_Shifted)
    for name, f, e, r in zip(["y", "dx", "dshift", "dscale"], fused, eager, exact):
        per_row = [v.detach().cpu().reshape(n, -1) for v in (f - r, e - r, r)]
        err, eager_err, size = (v.abs().amax(1) for v in per_row)
        bound = 2 * eager_err + ATOL[torch.float64] * size.clamp(min=1.0)
        assert (err <= bound).all(), (name, (err / bound).max().item(), int((err > bound).sum()))
