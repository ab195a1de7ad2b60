"""Sinusoidal time embedding shared by the built-in networks.

Networks receive normalised time τ = t/T ∈ [0, 1]. The embedding is applied to ``time_scale · τ`` so
that, with the default ``time_scale = 999``, it sees the range of DDPM's integer steps it was
designed for (raw τ would put every time in the first, slowest-varying period of all frequencies).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from sdeflow.plugin import require


def batch_times(tau: Tensor | float, batch: int, device: torch.device | None = None) -> Tensor:
    """Per-example times of shape (batch,) from a scalar, (1,), (B,) or (B, 1, ...) input.

    Squeezing is the usual way to accept (B, 1) times, but it turns a batch of one into a 0-d tensor
    (the reference code's crash); reshaping by element count does not.
    """
    tau = torch.as_tensor(tau, device=device)
    if tau.numel() == 1:
        return tau.reshape(1).expand(batch)
    if tau.numel() != batch:
        raise ValueError(f"expected {batch} times (one per example), got shape {tuple(tau.shape)}")
    return tau.reshape(batch)


def sinusoidal_embedding(steps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """The transformer/DDPM embedding [sin(s·ω_i), cos(s·ω_i)], ω_i = max_period^(−i/(dim/2 − 1)).

    ``steps`` has shape (B,); the result (B, dim) is float32 whatever the input dtype, because
    sin/cos of arguments up to ~1000 lose all precision in half precision.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=steps.device) / max(half - 1, 1)
    frequencies = torch.exp(-math.log(max_period) * exponent)
    angles = steps.to(torch.float32)[:, None] * frequencies[None, :]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return F.pad(embedding, (0, dim - 2 * half))  # odd dim: one zero column


class TimeEmbedding(nn.Module):
    """τ ↦ MLP(sinusoid(time_scale · τ)): Linear(embed_dim, hidden) → SiLU → Linear(hidden, out_dim)."""

    def __init__(self, embed_dim: int, hidden: int, out_dim: int, time_scale: float = 999.0):
        super().__init__()
        self.embed_dim = embed_dim
        self.time_scale = time_scale
        self.fc1 = nn.Linear(embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, tau: Tensor, batch: int) -> Tensor:
        steps = self.time_scale * batch_times(tau, batch, self.fc1.weight.device)
        embedding = sinusoidal_embedding(steps, self.embed_dim).to(self.fc1.weight.dtype)
        return self.fc2(F.silu(self.fc1(embedding)))


class FourierFeatures(nn.Module):
    """VDM's Fourier features (Kingma et al. 2021, App. C): y ↦ [y, sin(2ᵏ π y), cos(2ᵏ π y)] for
    k = min_exp … max_exp, on every channel (dimension 1), so the fine detail of the input that the
    likelihood depends on reaches the first layer. ``channels(c)`` is the width it turns c into."""

    def __init__(self, exponents: Sequence[int]):
        super().__init__()
        require(len(exponents) == 2 and all(float(e).is_integer() for e in exponents)
                and exponents[0] <= exponents[1], "fourier_features",
                f"must be [min_exp, max_exp], integers with min_exp ≤ max_exp, got {list(exponents)}")
        k = torch.arange(int(exponents[0]), int(exponents[1]) + 1, dtype=torch.float32)
        self.register_buffer("frequencies", 2.0**k * math.pi, persistent=False)  # checkpoints stay as they were

    def channels(self, c: int) -> int:
        return c * (1 + 2 * len(self.frequencies))

    def forward(self, y: Tensor) -> Tensor:
        angles = y.unsqueeze(2) * self.frequencies.view(1, 1, -1, *[1] * (y.ndim - 2)).to(y.dtype)
        return torch.cat([y, torch.sin(angles).flatten(1, 2), torch.cos(angles).flatten(1, 2)], dim=1)
