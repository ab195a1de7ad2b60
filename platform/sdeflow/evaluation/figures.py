"""Pictures of samples: PNG grids for images, scatter plots and λ-family trajectories for 2-D data."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from ..rundir.checkpoint import atomic_file


def new_figure(panels: int = 1, size: float = 4.0):
    """A matplotlib Figure and its axes, made without pyplot: no backend is switched, nothing is kept
    open, and a notebook displays it as it displays any figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size * panels, size))
    return fig, fig.subplots(1, panels, squeeze=False)[0]


def save_figure(fig, path: str | Path) -> Path:
    """Write a matplotlib figure as a PNG atomically."""
    fig.tight_layout()
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=120)
    return Path(path)


def samples_figure(x: Tensor, title: str = ""):
    """2-D vectors → a scatter plot (other vectors: the first two coordinates)."""
    x = x.detach().cpu().float()
    fig, (ax,) = new_figure()
    ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5)
    ax.set_aspect("equal")
    ax.set_title(title)
    return fig


def image_grid(x: Tensor) -> Tensor:
    """Images (N, C, H, W) in [0, 1] → one grid image (C, H', W'), ⌈√N⌉ a row."""
    from torchvision.utils import make_grid

    return make_grid(x.detach().cpu().float().clamp(0, 1), nrow=int(math.ceil(math.sqrt(x.shape[0]))))


def save_samples(x: Tensor, kind: str, path: str | Path, title: str = "") -> Path:
    """Images → a PNG grid; 2-D vectors → a scatter plot; other vectors → the first two coordinates."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "image":
        from torchvision.utils import save_image

        with atomic_file(path) as f:  # a full disk leaves the old picture, never a 0-byte PNG
            save_image(image_grid(x), f, format="png")
        return path
    return save_figure(samples_figure(x, title), path)


def trajectories_figure(paths: dict[str, Tensor], show: int = 16):
    """One panel per label (e.g. λ = 0, λ = 1): each 2-D path drawn from the prior (open circle) to the
    data (dot), the paper's Figure 5. ``paths[label]`` has shape (states, N, 2)."""
    fig, axes = new_figure(len(paths))
    for ax, (label, traj) in zip(axes, paths.items()):
        traj = traj.float()
        stride = max(1, (traj.shape[0] - 1) // 60)  # ~60 points a path: the shape, not every jitter
        coarse = torch.cat([traj[:-1:stride], traj[-1:]])
        ax.plot(coarse[:, :show, 0], coarse[:, :show, 1], lw=0.6, alpha=0.7)
        ax.scatter(traj[0, :show, 0], traj[0, :show, 1], s=12, facecolors="none", edgecolors="C3", lw=0.6)
        ax.scatter(traj[-1, :, 0], traj[-1, :, 1], s=2, c="k", alpha=0.5)
        ax.set_title(label)
        ax.set_aspect("equal")
    return fig


def save_trajectories(paths: dict[str, Tensor], path: str | Path, show: int = 16) -> Path:
    """:func:`trajectories_figure` written as a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(trajectories_figure(paths, show), path)


def image_for_tensorboard(path: str | Path) -> Tensor:
    """A saved PNG as a (3, H, W) float tensor, to log the exact picture that was written."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    with Image.open(path) as image:
        return pil_to_tensor(image.convert("RGB")).float() / 255
