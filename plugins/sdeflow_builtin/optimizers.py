"""Built-in optimizers: ``adam`` (the default) and ``adamw`` (decoupled weight decay), both with PyTorch's
fused one-kernel update where it has one for the parameters' device.

The kernel calls a factory with the trainable parameter groups (``{"params": [...], "lr": base rate}``,
from :meth:`sdeflow.objective.Objective.param_groups`) and ``train.lr``; the keyword arguments are the
``optimizer`` section's. The learning-rate schedule rescales each group's ``lr`` before every step.
"""

from __future__ import annotations

import torch

from sdeflow.plugin import fused_where_possible, hookimpl, require


def _check_moments(betas: tuple[float, float], eps: float) -> None:
    require(all(0.0 <= b < 1.0 for b in betas), "betas", f"must both be in [0, 1), got {list(betas)}")
    require(eps > 0, "eps", f"must be positive, got {eps}")


def adam(params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.Adam:
    """Adam (Kingma & Ba 2015, Algorithm 1), no weight decay."""
    _check_moments(betas, eps)
    groups = list(params)
    return torch.optim.Adam(groups, lr=lr, betas=betas, eps=eps, fused=fused_where_possible(groups))


def adamw(params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
          weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW: Adam with decoupled weight decay θ ← θ − lr·λ·θ (Loshchilov & Hutter 2019, Algorithm 2)."""
    _check_moments(betas, eps)
    require(weight_decay >= 0, "weight_decay", f"must be 0 or positive, got {weight_decay}")
    groups = list(params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             fused=fused_where_possible(groups))


@hookimpl
def sdeflow_register_optimizers(register) -> None:
    register("adam", adam)
    register("adamw", adamw)
