"""How a call reaches the kernels: autograd registered in C++ (no Python frame
between the dispatcher and the kernels, forward or backward), the wrappers'
direct path (_C.call) against torch.ops, and the cases that must take torch.ops."""

import os
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

import sit_ext
from sit_ext import _C, ops

D = 16
# The package's own files: a venv or a clone under a path named "sit_ext" holds
# torch's files too, and those are not ours.
PACKAGE_DIR = os.path.dirname(os.path.abspath(sit_ext.__file__)) + os.sep
FORWARD_OPS = ["interpolant", "velocity_mse", "mse", "ln_modulate", "gated_residual_ln_modulate",
               "gated_residual", "gelu_mlp"]
BACKWARD_OPS = [f"{name}_backward" for name in FORWARD_OPS]


def _calls(device):
    """(name, fn(*leaves) -> a scalar to differentiate, leaves) for every forward op."""
    x, h, noise, pred = (torch.randn(3, 5, D, device=device, requires_grad=True) for _ in range(4))
    mod = torch.randn(3, 3 * D, device=device, requires_grad=True)
    t = torch.rand(3, device=device)
    w1, b1, w2 = (torch.randn(shape, device=device, requires_grad=True) for shape in ((4 * D, D), (4 * D,), (D, 4 * D)))

    def parts(m):
        return m[:, :D], m[:, D:2 * D], m[:, 2 * D:]

    def grlm(x, h, m):
        shift, scale, gate = parts(m)
        x_out, y = ops.gated_residual_ln_modulate(x, h, gate, shift, scale)
        return x_out.square().sum() + y.square().sum()

    return [
        ("interpolant", lambda x, noise: sum(o.square().sum() for o in ops.interpolant(x, noise, t, "cosine")),
         (x, noise)),
        ("velocity_mse", lambda pred, x, noise: ops.velocity_mse(pred, x, noise, t, "vp"), (pred, x, noise)),
        ("mse", lambda pred, x: ops.mse(pred, x), (pred, x)),
        ("ln_modulate", lambda x, m: ops.ln_modulate(x, *parts(m)[:2]).square().sum(), (x, mod)),
        ("gated_residual_ln_modulate", grlm, (x, h, mod)),
        ("gated_residual", lambda x, h, m: ops.gated_residual(x, h, parts(m)[2]).square().sum(), (x, h, mod)),
        ("gelu_mlp", lambda x, w1, b1, w2: ops.gelu_mlp(x, w1, b1, w2).square().sum(), (x, w1, b1, w2)),
    ]


@pytest.mark.parametrize("name", FORWARD_OPS + BACKWARD_OPS)
def test_autograd_kernel_is_cpp(name):
    """Each op's Autograd kernel is registered from C++, not by torch.library in Python."""
    dump = torch._C._dispatch_dump(f"sit_ext::{name}")
    line = next(line for line in dump.splitlines() if line.startswith("Autograd["))
    assert "csrc/autograd/" in line, line


@pytest.mark.parametrize("case", range(len(FORWARD_OPS)), ids=FORWARD_OPS)
def test_no_python_between_dispatcher_and_kernels(device, case):
    """The forward runs one Python frame of sit_ext (the wrapper's checks) and
    the backward none: torch's own autograd engine calls the C++ nodes."""
    name, fn, leaves = _calls(device)[case]
    frames = []

    def profile(frame, event, arg):
        if event == "call" and os.path.abspath(frame.f_code.co_filename).startswith(PACKAGE_DIR):
            frames.append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        out = fn(*leaves)
        forward = list(frames)
        frames.clear()
        out.backward()
    finally:
        sys.setprofile(None)
    assert name in forward, f"{name}: the profile saw no frame of the wrapper: {forward}"
    assert frames == [], f"{name}: the backward ran Python: {frames}"
    assert set(forward) <= {name, "_direct", "_tensors", "_outputs", "_time_input", "schedule_id", "_eps",
                            "_out_dtype", "_check_weight", "_reduce", "<genexpr>"}, forward
    assert all(leaf.grad is not None and leaf.grad.abs().sum() > 0 for leaf in leaves), name


@pytest.mark.parametrize("case", range(len(FORWARD_OPS)), ids=FORWARD_OPS)
def test_direct_path_equals_torch_ops(device, case, monkeypatch):
    """_C.call and torch.ops give the same outputs and gradients, bit for bit."""
    name, fn, leaves = _calls(device)[case]
    results = []
    for direct in (True, False):
        if not direct:
            monkeypatch.setattr(ops, "_direct", lambda *tensors: False)
        for leaf in leaves:
            leaf.grad = None
        out = fn(*leaves)
        out.backward()
        results.append([out.detach()] + [leaf.grad.clone() for leaf in leaves])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b), name


class _Recorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_torch_function_modes_and_subclasses_take_torch_ops():
    """A __torch_function__ mode or tensor subclass sees the op as torch.ops
    would call it: the direct path stands aside for them."""
    x, shift, scale = torch.randn(2, 3, D), torch.randn(2, D), torch.randn(2, D)
    with _Recorder() as recorder:
        ops.ln_modulate(x, shift, scale)
    assert "sit_ext.ln_modulate.default" in recorder.seen

    class Sub(torch.Tensor):
        seen = []

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            cls.seen.append(str(func))
            return super().__torch_function__(func, types, args, kwargs)

    out = ops.gated_residual(x.as_subclass(Sub), torch.randn(2, 3, D), torch.randn(2, D))
    assert "sit_ext.gated_residual.default" in Sub.seen
    assert type(out) is Sub
    assert not ops._direct(x.as_subclass(Sub)) and ops._direct(x)


def test_direct_call_refuses_misuse():
    """_C.call is private, but a wrong call is an error, never a crash."""
    handle = _C.handle("sit_ext::gated_residual")
    x = torch.randn(2, 3, D)
    with pytest.raises(ValueError, match="takes 3 arguments, got 2"):
        _C.call(handle, x, x)
    with pytest.raises(TypeError, match="op handle"):
        _C.call("sit_ext::gated_residual", x, x, x)
    with pytest.raises(TypeError, match="unsupported type"):
        _C.call(handle, x, x, {})
    with pytest.raises(RuntimeError, match="Expected Tensor"):
        _C.call(handle, x, x, 1.0)
    with pytest.raises(ValueError, match="not a sit_ext op"):
        _C.handle("aten::add")
    with pytest.raises(RuntimeError, match="expected gate of shape"):
        _C.call(handle, x, x, torch.randn(3, D))
