"""Runs every sit_ext CUDA op, forward and backward, once on small inputs in
each dtype, through both the 16-byte and the scalar code paths: the workload
that bench/device_check.sh runs under compute-sanitizer."""

import torch

import sit_ext  # noqa: F401
from sit_ext import ops


def interpolant_family(dtype, n):
    x, noise, pred = (torch.randn(3, n, device="cuda", dtype=dtype) for _ in range(3))
    t = torch.rand(3, device="cuda", requires_grad=True)
    coefficients = [torch.rand(3, device="cuda", requires_grad=True) for _ in range(4)]
    for leaf in (x, noise, pred):
        leaf.requires_grad_()
    xt, ut = ops.interpolant(x, noise, t, "vp")
    loss = ops.velocity_mse(pred, x, noise, t, "cosine") + (xt * ut).float().mean()
    xt2, _ = ops.interpolant(x, noise, coefficients=coefficients, outputs=(True, False))
    loss = loss + ops.velocity_mse(pred, x, noise, coefficients=coefficients) + ops.mse(pred, xt2)
    loss.backward()


def adaln_family(dtype, shape):
    x, h = (torch.randn(shape, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    params = torch.randn(shape[0], 6 * shape[-1], device="cuda", dtype=dtype, requires_grad=True)
    s1, c1, g1, s2, c2, g2 = params.chunk(6, dim=1)
    y = ops.ln_modulate(x, s1, c1)
    x2, y2 = ops.gated_residual_ln_modulate(x, h * y, g1, s2, c2)
    out = ops.gated_residual(x2, y2, g2)
    out.float().square().mean().backward()
    # Only one output of gated_residual_ln_modulate used, and [B, D] inputs.
    ops.gated_residual_ln_modulate(x, h, g1, s2, c2)[0].float().sum().backward()
    flat = x[:, 0].detach().requires_grad_()
    ops.gated_residual_ln_modulate(flat, flat * 2, g1, s2, c2)[1].float().sum().backward()


def main():
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for n in (4096, 4099):  # 16-byte packs, and the single-element path
            interpolant_family(dtype, n)
        # vectorised (D = 1152, 4096), single-element (D = 7, 1 and 5000) paths
        for shape in ((2, 33, 1152), (2, 5, 4096), (3, 9, 7), (2, 3, 1), (2, 3, 5000)):
            adaln_family(dtype, shape)
    torch.cuda.synchronize()
    print("sanitize_ops: ran every op")


if __name__ == "__main__":
    main()
