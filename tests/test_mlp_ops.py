"""The MLP op (gelu_mlp: fc1, tanh GELU, fc2 in one op) against the official
Mlp written out in plain PyTorch: values and every gradient, dtypes, shapes,
strides, autocast (and its weight-cast cache), gradcheck, opcheck,
torch.compile, bad input, and on CUDA the cuBLASLt epilogue path itself."""

import pytest
import torch
from conftest import ATOL, DTYPES, LOW_PRECISION
from helpers import assert_close_to_ref, expect_error, leaves

from sit_ext import ops
from sit_ext import reference as ref

# (x's shape, H, N): model-like ([B, T, D] with H = 4D), the [B, D] vector model, a single row, odd
# sizes (off the CUDA epilogue path: K, H or N not a multiple of 8), and 1-D x.
CASES = [((2, 16, 64), 256, 64), ((5, 32), 128, 32), ((1, 1, 8), 32, 8), ((3, 4, 7), 12, 5),
         ((2, 3, 16), 20, 16), ((2, 9, 24), 96, 24), ((8,), 16, 8)]


def weights(k, h, n, dtype, device, b2=True):
    """(w1, b1, w2, b2) scaled as nn.Linear's initialisation, so that fc1's
    outputs span GELU's curved part and its tails."""
    w1 = torch.randn(h, k, dtype=dtype, device=device) / k ** 0.5
    w2 = torch.randn(n, h, dtype=dtype, device=device) / h ** 0.5
    b1, b2_ = torch.randn(h, dtype=dtype, device=device), torch.randn(n, dtype=dtype, device=device)
    return w1, b1, w2, (b2_ if b2 else None)


def run(impl, x, w1, b1, w2, b2, upstream):
    """The output, then the gradients of every input."""
    inputs = [x, w1, b1, w2] + ([b2] if b2 is not None else [])
    out = impl.gelu_mlp(x, w1, b1, w2, b2)
    return [out, *torch.autograd.grad((out * upstream.to(out.dtype)).sum(), inputs)]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_b2", [True, False], ids=["b2", "no-b2"])
def test_matches_reference(device, case, dtype, with_b2):
    shape, h, n = case
    x = torch.randn(shape, dtype=dtype, device=device)
    params = weights(shape[-1], h, n, dtype, device, with_b2)
    upstream = torch.randn(*shape[:-1], n, dtype=dtype, device=device)

    def go(impl, dtype_=None):
        got = leaves(x, *(p for p in params if p is not None), dtype=dtype_)
        return run(impl, got[0], *got[1:4], got[4] if with_b2 else None, upstream)

    fused, eager, exact = go(ops), go(ref, dtype), go(ref, torch.float64)
    names = ["out", "dx", "dw1", "db1", "dw2", "db2"]
    for name, f, e, r in zip(names, fused, eager, exact):
        assert f.dtype == dtype, name
        assert_close_to_ref(f, e, r, ATOL[dtype], f"gelu_mlp {name}")


def test_strided_and_offset_x(device):
    """x as a strided view and as a view at an offset: read as the values they are."""
    w1, b1, w2, b2 = weights(16, 64, 16, torch.float32, device)
    wide = torch.randn(3, 5, 32, device=device)
    for x in (wide[..., ::2], wide[:, 1:, 3:19], wide.transpose(0, 1)[..., :16]):
        torch.testing.assert_close(ops.gelu_mlp(x, w1, b1, w2, b2), ref.gelu_mlp(x, w1, b1, w2, b2),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("low", LOW_PRECISION, ids=str)
def test_autocast(device, low):
    """Under autocast, float32 x and parameters run in autocast's dtype, as
    nn.Linear would: the output is in that dtype, the gradients come back in
    float32, within the bound of eager PyTorch under the same autocast."""
    if device == "cpu" and low == torch.float16:
        pytest.skip("CPU autocast's default dtype is bfloat16; float16 autocast is a CUDA configuration")
    x = torch.randn(2, 16, 64, device=device)
    params = weights(64, 256, 64, torch.float32, device)
    upstream = torch.randn(2, 16, 64, device=device)

    def go(impl, dtype_=None, autocast=True):
        got = leaves(x, *params, dtype=dtype_)
        with torch.autocast(device, dtype=low, enabled=autocast):
            return run(impl, *got, upstream)

    fused, eager, exact = go(ops), go(ref), go(ref, torch.float64, autocast=False)
    assert fused[0].dtype == low and eager[0].dtype == low
    for name, f, e, r in zip(["out", "dx", "dw1", "db1", "dw2", "db2"], fused, eager, exact):
        assert f.dtype == e.dtype, name
        assert_close_to_ref(f, e, r, ATOL[low], f"autocast gelu_mlp {name}")


def test_autocast_casts_each_weight_once_per_region(device):
    """The Autocast kernel casts through autocast's cache: within one region a
    second call casts x (not a leaf parameter) but no weight again."""
    x = torch.randn(2, 4, 16, device=device)
    params = [p.requires_grad_() for p in weights(16, 32, 16, torch.float32, device)]
    casts = []

    class Casts(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype):
                casts.append(args[0].shape)
            return func(*args, **(kwargs or {}))

    with torch.autocast(device, dtype=torch.bfloat16):
        with Casts():
            ops.gelu_mlp(x, *params)
        first = list(casts)
        casts.clear()
        with Casts():
            ops.gelu_mlp(x, *params)
    assert sorted(map(tuple, first)) == sorted([(2, 4, 16), (32, 16), (32,), (16, 32), (16,)])
    assert [tuple(s) for s in casts] == [(2, 4, 16)]


def test_gradcheck_float64(device):
    kw = dict(dtype=torch.float64, device=device, requires_grad=True)
    x = torch.randn(2, 3, 5, **kw)
    w1, b1, w2, b2 = (t.requires_grad_() for t in weights(5, 7, 4, torch.float64, device))
    assert torch.autograd.gradcheck(ops.gelu_mlp, (x, w1, b1, w2, b2))
    assert torch.autograd.gradcheck(lambda *a: ops.gelu_mlp(*a), (x, w1, b1, w2))
    assert torch.autograd.gradcheck(ops.gelu_mlp, (torch.randn(3, 5, **kw), w1, b1, w2, b2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(device, dtype):
    x = torch.randn(2, 4, 16, device=device, dtype=dtype)
    w1, b1, w2, b2 = weights(16, 32, 8, dtype, device)
    with torch.no_grad():
        _, act, pre = torch.ops.sit_ext.gelu_mlp(x, w1, b1, w2, b2)
    grad = torch.randn(2, 4, 8, device=device, dtype=dtype)
    leaf = lambda t: t.clone().requires_grad_()  # noqa: E731
    cases = [
        (torch.ops.sit_ext.gelu_mlp.default, (leaf(x), leaf(w1), leaf(b1), leaf(w2), leaf(b2))),
        (torch.ops.sit_ext.gelu_mlp.default, (leaf(x), leaf(w1), leaf(b1), leaf(w2), None)),
        (torch.ops.sit_ext.gelu_mlp.default, (x, leaf(w1), b1, w2)),
        (torch.ops.sit_ext.gelu_mlp_backward.default, (grad, x, w1, w2, act, pre, [True] * 5)),
        (torch.ops.sit_ext.gelu_mlp_backward.default, (grad, x, w1, w2, act, pre, [False, True, True, False, False])),
        (torch.ops.sit_ext.gelu_mlp_backward.default, (grad, x, w1, w2, act, pre, [True, False, False, True, False])),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_torch_compile_fullgraph(device, autocast):
    torch._dynamo.reset()
    x = torch.randn(3, 10, 32, device=device)
    params = weights(32, 128, 32, torch.float32, device)

    def mlp(x, w1, b1, w2, b2):
        return ops.gelu_mlp(x, w1, b1, w2, b2).float().square().mean()

    def loss_and_grads(fn):
        got = leaves(x, *params)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            loss = fn(*got)
        loss.backward()
        return [loss] + [t.grad for t in got]

    for got, want in zip(loss_and_grads(torch.compile(mlp, fullgraph=True)), loss_and_grads(mlp)):
        torch.testing.assert_close(got, want)


def test_unused_parameters_get_no_gradient(device):
    """Only the gradients asked for are made: a frozen fc1 (say, LoRA on fc2)."""
    x = torch.randn(2, 3, 8, device=device, requires_grad=True)
    w1, b1, w2, b2 = weights(8, 16, 8, torch.float32, device)
    w2.requires_grad_()
    ops.gelu_mlp(x, w1, b1, w2, b2).sum().backward()
    want = torch.autograd.grad(ref.gelu_mlp(x, w1, b1, w2, b2).sum(), (x, w2))
    torch.testing.assert_close(x.grad, want[0])
    torch.testing.assert_close(w2.grad, want[1])
    assert w1.grad is None and b1.grad is None and b2.grad is None


@pytest.mark.parametrize("shape", [(0, 4, 8), (2, 0, 8), (0, 8)], ids=str)
def test_empty_rows(device, shape):
    """No rows: an empty output, and weight gradients that are sums over nothing (zeros)."""
    x = torch.randn(shape, device=device, requires_grad=True)
    params = [p.requires_grad_() for p in weights(8, 16, 4, torch.float32, device)]
    out = ops.gelu_mlp(x, *params)
    assert out.shape == (*shape[:-1], 4)
    out.sum().backward()
    assert x.grad.shape == shape
    for p in params:
        assert torch.equal(p.grad, torch.zeros_like(p)), p.shape


def test_bad_input(device):
    x = torch.randn(2, 4, 8, device=device)
    w1, b1, w2, b2 = weights(8, 16, 4, torch.float32, device)
    expect_error(lambda: ops.gelu_mlp(x, w1[:, :7], b1, w2), "w1", "[H, 8]")
    expect_error(lambda: ops.gelu_mlp(x, w1, b1[:3], w2), "b1", "[16]")
    expect_error(lambda: ops.gelu_mlp(x, w1, b1, w2[:, :3]), "w2", "[N, 16]")
    expect_error(lambda: ops.gelu_mlp(x, w1, b1, w2, b2[:2]), "b2", "[4]")
    expect_error(lambda: ops.gelu_mlp(x, w1.double(), b1, w2), "w1", "dtype of x")
    expect_error(lambda: ops.gelu_mlp(x, w1, b1.half(), w2), "b1", "dtype of x")
    expect_error(lambda: ops.gelu_mlp(x.int(), w1, b1, w2), "x", "float")
    expect_error(lambda: ops.gelu_mlp(x, w1[0], b1, w2), "w1", "2 dimension")
    expect_error(lambda: ops.gelu_mlp(x[0, 0, 0], w1, b1, w2), "x", "0-d")
    expect_error(lambda: ops.gelu_mlp(x[..., :0], w1[:, :0], b1, w2), "non-empty")
    other = "meta" if device == "cpu" else "cpu"
    expect_error(lambda: ops.gelu_mlp(x, w1, b1, w2.to(other)), "w2", other)
    with pytest.raises(TypeError, match="b1 must be a Tensor"):
        ops.gelu_mlp(x, w1, [0.0] * 16, w2)
    with torch.no_grad():
        _, act, pre = torch.ops.sit_ext.gelu_mlp(x, w1, b1, w2)
    grad = torch.randn(2, 4, 4, device=device)
    expect_error(lambda: torch.ops.sit_ext.gelu_mlp_backward(grad[..., :3], x, w1, w2, act, pre, [True] * 5),
                 "grad", "[..., 4]")
    expect_error(lambda: torch.ops.sit_ext.gelu_mlp_backward(grad, x, w1, w2, act[:3], pre, [True] * 5),
                 "act", "[8, 16]")


def test_double_backward_refused(device):
    x = torch.randn(2, 3, 8, device=device, dtype=torch.float64, requires_grad=True)
    w1, b1, w2, b2 = weights(8, 16, 8, torch.float64, device)
    (g,) = torch.autograd.grad(ops.gelu_mlp(x, w1, b1, w2, b2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="second-order gradients"):
        g.sum().backward()


# ---- CUDA: the epilogue path


def _gelu_kernels(fn):
    """Names of ATen's elementwise GELU kernels (forward or backward) that fn launches."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return [n for n in names if "GeluCUDAKernelImpl" in n or "GeluBackwardCUDAKernelImpl" in n]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_cuda_epilogue_path_replaces_the_gelu_passes(dtype):
    """At SiT shapes in half precision, forward and backward launch no GELU
    kernel of ATen's (the epilogues did that work); at an odd width they do
    (the fallback), and both match the reference."""
    for k, expect_epilogue in ((64, True), (60, False)):
        x = torch.randn(4, 32, k, device="cuda", dtype=dtype, requires_grad=True)
        params = [p.requires_grad_() for p in weights(k, 4 * k, k, dtype, "cuda", b2=False)[:3]]

        def step(x=x, params=params):
            ops.gelu_mlp(x, *params).float().square().sum().backward()

        launched = _gelu_kernels(step)
        assert (launched == []) == expect_epilogue, (k, launched)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_graph_capture_equals_eager():
    """Forward and backward captured in a CUDA graph give eager's numbers."""
    x = torch.randn(4, 64, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    params = [p.requires_grad_() for p in weights(128, 512, 128, torch.bfloat16, "cuda")]
    upstream = torch.randn(4, 64, 128, device="cuda", dtype=torch.bfloat16)

    def step():
        out = ops.gelu_mlp(x, *params)
        return [out, *torch.autograd.grad((out * upstream).sum(), [x, *params])]

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up off the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, step()):
        torch.testing.assert_close(got, want)
