"""PNG pictures (matplotlib, the optional extra ``sit_ext[plot]``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("pictures need matplotlib: pip install 'sit_ext[plot]' (or pip install matplotlib)") from None
    return plt


def _save(plt, fig, path: str) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def scatter(path: str, panels: dict[str, Tensor], title: str = "") -> None:
    """Side-by-side scatter plots of 2-D point sets, on shared axes."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.2), squeeze=False)
    everything = torch.cat([p.float().cpu() for p in panels.values()])
    lo, hi = torch.quantile(everything, 0.002, dim=0), torch.quantile(everything, 0.998, dim=0)
    for ax, (name, points) in zip(axes[0], panels.items()):
        p = points.float().cpu()
        ax.scatter(p[:, 0], p[:, 1], s=1, alpha=0.4, color="tab:blue" if name != "samples" else "tab:orange")
        ax.set_title(name)
        ax.set_xlim(lo[0].item(), hi[0].item())
        ax.set_ylim(lo[1].item(), hi[1].item())
        ax.set_aspect("equal")
    if title:
        fig.suptitle(title)
    _save(plt, fig, path)


def image_grid(path: str, images: Tensor, nrow: int | None = None, title: str = "") -> None:
    """A grid of images [N, C, H, W]: 1 channel as grey, otherwise the first 3
    channels as RGB; each image scaled to its own range."""
    plt = _pyplot()
    x = images.float().cpu()
    x = x[:, :1] if x.shape[1] < 3 else x[:, :3]
    lo = x.flatten(1).min(1).values[:, None, None, None]
    hi = x.flatten(1).max(1).values[:, None, None, None]
    x = (x - lo) / (hi - lo).clamp_min(1e-8)
    n = x.shape[0]
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    c, h, w = x.shape[1:]
    canvas = torch.ones(c, ncol * (h + 1) + 1, nrow * (w + 1) + 1)
    for i in range(n):
        r, q = divmod(i, nrow)
        canvas[:, 1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = x[i]
    fig = plt.figure(figsize=(max(3, nrow * 0.6), max(3, ncol * 0.6)))
    plt.imshow(canvas[0] if c == 1 else canvas.permute(1, 2, 0), cmap="gray" if c == 1 else None,
               interpolation="nearest")
    plt.axis("off")
    if title:
        plt.title(title)
    _save(plt, fig, path)


def speedup_bars(path: str, labels: list[str], ratios: dict[str, list[float]], title: str = "") -> None:
    """Grouped horizontal bars of speed-ups (1 = parity, drawn as a line)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(labels) * len(ratios) + 1.5))
    height = 0.8 / max(len(ratios), 1)
    for k, (name, values) in enumerate(ratios.items()):
        ax.barh([i + k * height for i in range(len(labels))], values, height=height, label=name)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks([i + height * (len(ratios) - 1) / 2 for i in range(len(labels))])
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up of the fused op (x)")
    ax.legend()
    if title:
        ax.set_title(title)
    _save(plt, fig, path)
