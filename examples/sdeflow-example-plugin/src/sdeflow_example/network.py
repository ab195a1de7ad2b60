"""A small residual MLP for vector (or flattened) data, conditioned on time by a sinusoidal embedding."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from sdeflow.plugin import require


def sinusoidal_embedding(x: Tensor, dim: int) -> Tensor:
    """Transformer-style embedding of a (B,) tensor: [sin(x ω_k), cos(x ω_k)], ω_k from 1 to 1e-4."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=x.device, dtype=x.dtype) / half)
    angles = x[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    return nn.functional.pad(emb, (0, dim - 2 * half))


class ResidualBlock(nn.Module):
    """h ← h + W₂ SiLU(W₁ SiLU(h) + time embedding)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.inner = nn.Linear(hidden, hidden)
        self.time = nn.Linear(hidden, hidden)
        self.outer = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, temb: Tensor) -> Tensor:
        z = self.inner(nn.functional.silu(h)) + self.time(temb)
        return h + self.outer(nn.functional.silu(z))


class ResMLP(nn.Module):
    """(y, τ) → tensor shaped like y, with τ = t/T ∈ [0, 1] of shape (B,).

    The embedding sees ``time_scale``·τ so its frequencies cover a useful range (MATH.md §2).
    The last layer starts at zero: the untrained network outputs 0 whatever its input.
    """

    def __init__(
        self, data_shape: tuple[int, ...], hidden: int = 64, blocks: int = 2, time_scale: float = 999.0
    ):
        super().__init__()
        shape_ok = len(data_shape) > 0 and all(d > 0 for d in data_shape)
        require(shape_ok, "data_shape", f"must be a non-empty tuple of positive sizes, got {data_shape}")
        require(hidden > 0, "hidden", f"must be positive, got {hidden}")
        require(blocks >= 0, "blocks", f"must be >= 0, got {blocks}")
        require(time_scale > 0, "time_scale", f"must be positive, got {time_scale}")
        self.data_shape = tuple(data_shape)
        self.hidden = hidden
        self.time_scale = time_scale
        dim = math.prod(self.data_shape)
        self.embed_time = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.input = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(ResidualBlock(hidden) for _ in range(blocks))
        self.output = nn.Linear(hidden, dim)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, y: Tensor, tau: Tensor) -> Tensor:
        tau = torch.as_tensor(tau, dtype=y.dtype, device=y.device).expand(y.shape[0])
        temb = self.embed_time(sinusoidal_embedding(self.time_scale * tau, self.hidden))
        h = self.input(y.reshape(y.shape[0], -1))
        for block in self.blocks:
            h = block(h, temb)
        return self.output(nn.functional.silu(h)).reshape(y.shape)
