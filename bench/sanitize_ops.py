"""Runs every sit_ext CUDA op, forward and backward, on small inputs through
every code path: each dtype and autocast mix, 16-byte packs and single
elements (odd D, a view offset by one element), resident and streamed rows
(D > 4096 backward, > 8192 forward), empty batches and T = 0; gelu_mlp on
its cuBLASLt epilogue path and its fallback. This is the
workload that bench/device_check.sh runs under compute-sanitizer (with
PYTORCH_NO_CUDA_MEMORY_CACHING=1, so that out-of-bounds accesses land
outside an allocation instead of inside the caching allocator's blocks)."""

import sys

import torch

import sit_ext  # noqa: F401
from sit_ext import ops

DEVICE = sys.argv[1] if len(sys.argv) > 1 else "cuda"  # "cpu" for a quick dry run

# (x dtype, h/modulation dtype, y dtype): one dtype, and the autocast mixes.
ADALN_TYPES = [(d, d, d) for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)] + [
    (torch.float32, low, y) for low in (torch.bfloat16, torch.float16) for y in (torch.float32, low)]
LOSS_TYPES = [(d, d) for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)] + [
    (torch.bfloat16, torch.float32), (torch.float32, torch.float16)]


def offset_view(shape, dtype):
    """A tensor of `shape` starting one element into its buffer (not 16-byte aligned)."""
    n = 1
    for s in shape:
        n *= s
    return torch.randn(n + 1, device=DEVICE, dtype=dtype)[1:].view(shape)


def interpolant_family(pred_dtype, x_dtype, n, offset=False):
    make = offset_view if offset else (lambda shape, dtype: torch.randn(shape, device=DEVICE, dtype=dtype))
    x, noise = make((3, n), x_dtype), make((3, n), x_dtype)
    pred = make((3, n), pred_dtype)
    t = torch.rand(3, device=DEVICE, requires_grad=True)
    coefficients = [torch.rand(3, device=DEVICE, requires_grad=True) for _ in range(4)]
    for leaf in (x, noise, pred):
        leaf.requires_grad_()
    loss = ops.velocity_mse(pred, x, noise, t, "cosine") + ops.velocity_mse(pred, x, noise, coefficients=coefficients)
    if pred_dtype == x_dtype:
        xt, ut = ops.interpolant(x, noise, t, "vp")
        xt2, _ = ops.interpolant(x, noise, coefficients=coefficients, outputs=(True, False))
        loss = loss + (xt * ut).float().mean() + ops.mse(pred, xt2)
    loss = loss + ops.mse(pred, x)
    loss.backward()


def adaln_family(types, shape, offset=False):
    x_dtype, low, y_dtype = types
    make = offset_view if offset else (lambda shape, dtype: torch.randn(shape, device=DEVICE, dtype=dtype))
    x, h = make(shape, x_dtype).requires_grad_(), make(shape, low).requires_grad_()
    params = torch.randn(shape[0], 6 * shape[-1], device=DEVICE, dtype=low, requires_grad=True)
    s1, c1, g1, s2, c2, g2 = params.chunk(6, dim=1)
    y = ops.ln_modulate(x, s1, c1, out_dtype=y_dtype)
    x2, y2 = ops.gated_residual_ln_modulate(x, h * y.to(low), g1, s2, c2, out_dtype=y_dtype)
    out = ops.gated_residual(x2, y2.to(low), g2)
    out.float().square().mean().backward()
    # Only one output of gated_residual_ln_modulate used, and [B, D] inputs.
    ops.gated_residual_ln_modulate(x, h, g1, s2, c2)[0].float().sum().backward()
    if shape[1] > 0:
        flat = x[:, 0].detach().requires_grad_()
        ops.gated_residual_ln_modulate(flat, h[:, 0].detach(), g1, s2, c2)[1].float().sum().backward()


def mlp_family(dtype, shape, hidden, out, offset=False, autocast=False):
    """gelu_mlp forward and backward: the cuBLASLt epilogue path (half precision,
    K, H, N multiples of 8, aligned) or the ATen fallback (anything else)."""
    make = offset_view if offset else (lambda shape, dtype: torch.randn(shape, device=DEVICE, dtype=dtype))
    weight_dtype = torch.float32 if autocast else dtype
    x, w1, b1, w2, b2 = (make(s, weight_dtype).requires_grad_()
                         for s in (shape, (hidden, shape[-1]), (hidden,), (out, hidden), (out,)))
    with torch.autocast(DEVICE, dtype=dtype, enabled=autocast):
        y = ops.gelu_mlp(x, w1, b1, w2) + ops.gelu_mlp(x, w1, b1, w2, b2)
    y.float().square().mean().backward()


def main():
    for pred_dtype, x_dtype in LOSS_TYPES:
        for n in (4096, 4099):  # 16-byte packs, and the single-element path
            interpolant_family(pred_dtype, x_dtype, n)
        interpolant_family(pred_dtype, x_dtype, 4096, offset=True)
    interpolant_family(torch.float32, torch.float32, 0)
    for types in ADALN_TYPES:
        # packs (D = 1152, 4096), single elements (D = 7, 1, 5001), streamed rows (D = 5000, 9000)
        for shape in ((2, 33, 1152), (2, 5, 4096), (3, 9, 7), (2, 3, 1), (2, 3, 5001), (2, 3, 5000),
                      (2, 2, 9000), (2, 0, 64), (0, 3, 64)):
            adaln_family(types, shape)
        adaln_family(types, (2, 5, 1152), offset=True)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        # the epilogue path (half precision), odd widths and an offset x (the fallback), no rows
        for shape, hidden, out in (((2, 33, 64), 256, 64), ((3, 5, 24), 40, 16), ((2, 3, 7), 12, 5),
                                   ((0, 3, 64), 256, 64)):
            mlp_family(dtype, shape, hidden, out)
        mlp_family(dtype, (2, 5, 64), 256, 64, offset=True)
    mlp_family(torch.bfloat16, (2, 33, 64), 256, 64, autocast=True)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    print("sanitize_ops: ran every op")


if __name__ == "__main__":
    main()
