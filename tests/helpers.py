"""Shared test helpers: inputs in several layouts, and error bounds relative to
what eager PyTorch achieves at the same precision."""

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
    """adaLN-Zero starts every block as the identity; give the zeroed layers
    weights so that fused and unfused paths are compared on real work."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model
