"""Pictures of samples: PNG grids for images, scatter plots and λ-family trajectories for 2-D data."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import atomic_file


def pyplot_agg():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Write a matplotlib figure as a PNG atomically, then close it."""
    plt = pyplot_agg()
    try:
        fig.tight_layout()
        with atomic_file(path) as f:
            fig.savefig(f, format="png", dpi=120)
    finally:
        plt.close(fig)
    return Path(path)


def save_samples(x: Tensor, kind: str, path: str | Path, title: str = "") -> Path:
    """Images → a PNG grid; 2-D vectors → a scatter plot; other vectors → the first two coordinates."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = x.detach().cpu().float()
    if kind == "image":
        from torchvision.utils import save_image

        with atomic_file(path) as f:  # a full disk leaves the old picture, never a 0-byte PNG
            save_image(x.clamp(0, 1), f, format="png", nrow=int(math.ceil(math.sqrt(x.shape[0]))))
        return path
    plt = pyplot_agg()
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5)
    ax.set_aspect("equal")
    ax.set_title(title)
    return save_figure(fig, path)


def save_trajectories(paths: dict[str, Tensor], path: str | Path, show: int = 16) -> Path:
    """One panel per label (e.g. λ = 0, λ = 1): each 2-D path drawn from the prior to the data
    (the paper's Figure 5). ``paths[label]`` has shape (states, N, 2)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plt = pyplot_agg()
    fig, axes = plt.subplots(1, len(paths), figsize=(4 * len(paths), 4), squeeze=False)
    for ax, (label, traj) in zip(axes[0], paths.items()):
        traj = traj.float()
        stride = max(1, (traj.shape[0] - 1) // 60)  # ~60 points a path: the shape, not every jitter
        coarse = torch.cat([traj[:-1:stride], traj[-1:]])
        ax.plot(coarse[:, :show, 0], coarse[:, :show, 1], lw=0.6, alpha=0.7)
        ax.scatter(traj[-1, :, 0], traj[-1, :, 1], s=2, c="k", alpha=0.5)
        ax.set_title(label)
        ax.set_aspect("equal")
    return save_figure(fig, path)


def image_for_tensorboard(path: str | Path) -> Tensor:
    """A saved PNG as a (3, H, W) float tensor, to log the exact picture that was written."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    with Image.open(path) as image:
        return pil_to_tensor(image.convert("RGB")).float() / 255
