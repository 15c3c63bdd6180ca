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


def main():
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for n in (4096, 4099):  # 16-byte packs, and the single-element path
            interpolant_family(dtype, n)
    torch.cuda.synchronize()
    print("sanitize_ops: ran every op")


if __name__ == "__main__":
    main()
