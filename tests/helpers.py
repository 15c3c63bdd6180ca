"""Shared test helpers: inputs in several layouts, and error bounds relative to
what eager PyTorch achieves at the same precision."""

import math

import pytest
import torch


def randn(shape, dtype, device, strided=False):
    """Fresh N(0, 1) values; `strided` gives a non-contiguous view of the same shape."""
    if not strided:
        return torch.randn(shape, dtype=dtype, device=device)
    wide = torch.randn(*shape[:-1], 2 * shape[-1], dtype=dtype, device=device)
    return wide[..., ::2]


def rand_time(batch, device, strided=False, dtype=torch.float32):
    """t in [0.05, 0.95]: away from the VP schedule's singularity at t = 0."""
    t = 0.05 + 0.9 * torch.rand(2 * batch if strided else batch, device=device, dtype=dtype)
    return t[::2] if strided else t


def max_err(a, b):
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def assert_close_to_ref(fused, eager, ref64, atol, what=""):
    """|fused - ref64| <= 2 |eager - ref64| + atol (max over elements), where
    eager is plain PyTorch at the fused op's precision."""
    assert fused.shape == ref64.shape, f"{what}: shape {tuple(fused.shape)} != {tuple(ref64.shape)}"
    err, eager_err = max_err(fused, ref64), max_err(eager, ref64)
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    assert err <= 2 * eager_err + atol * scale, (
        f"{what}: fused error {err:.3e} > 2 x eager error {eager_err:.3e} + {atol * scale:.1e}"
    )


def leaves(*tensors, dtype=None):
    """Detached leaves that require grad: the same strides, or converted to dtype
    (as contiguous copies) for the eager and float64 references."""
    out = []
    for t in tensors:
        t = t.detach() if dtype is None else t.detach().to(dtype).contiguous()
        out.append(t.requires_grad_(True))
    return out


def expect_error(fn, *fragments):
    """fn raises a ValueError or RuntimeError whose message holds every fragment."""
    with pytest.raises((ValueError, RuntimeError)) as info:
        fn()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def assert_bitwise_reproducible(fn):
    """fn() returns the same bits twice over, with 1 and with 2+ CPU threads."""
    first = fn()
    threads = torch.get_num_threads()
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            for _ in range(2):
                assert all(torch.equal(a, b) for a, b in zip(first, fn()))
    finally:
        torch.set_num_threads(threads)


def randomize_zero_init(model):
    """adaLN-Zero starts every block as the identity, and every Linear bias at
    zero; give the zeroed layers and biases values so that fused and unfused
    paths are compared on real work (a folded bias added twice, or not at all,
    changes nothing while it is zero)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer" in name or (name.endswith("bias") and not p.any()):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def assert_matches_ref(fused, eager, ref64, atol, what=""):
    """assert_close_to_ref for values of any magnitude, inf and NaN included.

    `eager` is one tensor or several: ways plain PyTorch computes the value at
    the fused op's precision (the largest error counts). With e = max|eager -
    ref64| (where eager is finite) and s = max|ref64| (where ref64 is):
    - where ref64 is not finite, neither is fused;
    - where it is, |fused - ref64| <= 2 e + atol s + one rounding to fused's
      dtype (eps |ref64| plus its smallest subnormal), or fused is inf where
      that much error would reach the dtype's overflow threshold.
    Unlike assert_close_to_ref, atol is relative to the output's own magnitude
    (not at least 1), so tiny values are checked too."""
    assert fused.shape == ref64.shape, f"{what}: shape {tuple(fused.shape)} != {tuple(ref64.shape)}"
    if fused.numel() == 0:
        return
    ref, got = ref64.detach().double(), fused.detach().double()
    exact = torch.isfinite(ref)

    def fail(mask, why):
        i = tuple(mask.nonzero()[0].tolist())
        raise AssertionError(f"{what}: at {i} got {got[i].item()}, but the float64 reference is {ref[i].item()}: "
                             f"{why} ({int(mask.sum())} of {got.numel()} elements)")

    lost = ~exact & torch.isfinite(got)
    if lost.any():
        fail(lost, "a finite value where the exact one is not")
    if not exact.any():
        return
    eager_err = 0.0
    for low in [eager] if isinstance(eager, torch.Tensor) else eager:
        diff = (low.detach().double() - ref)[exact & torch.isfinite(low)]
        eager_err = max(eager_err, diff.abs().max().item() if diff.numel() else 0.0)
    ref0 = torch.where(exact, ref, 0.0)
    info = torch.finfo(fused.dtype)
    rounding = info.eps * ref0.abs() + info.smallest_normal * info.eps
    bound = 2 * eager_err + atol * ref0.abs().max().item()
    finite = torch.isfinite(got)
    overflow = got.isinf() & (ref0.abs() + rounding + bound >= info.max)
    spurious = exact & ~finite & ~overflow
    if spurious.any():
        fail(spurious, "non-finite where the exact value is finite and well inside the dtype's range")
    err = torch.where(exact & finite, (got - ref0).abs() - rounding, -math.inf).max().item()
    assert err <= bound, (f"{what}: fused error {err:.3e} (beyond one rounding) > 2 x eager error {eager_err:.3e} "
                          f"+ atol x scale = {bound:.3e}")
