"""A time-conditioned residual MLP for vector data (Swiss roll, Gaussian mixtures, ...)."""

from __future__ import annotations

import math

from torch import Tensor, nn
from torch.nn import functional as F

from sdeflow.plugin import require

from .embedding import FourierFeatures, TimeEmbedding


class MLP(nn.Module):
    """y ↦ Linear → ``depth`` residual blocks h + W₂ SiLU(W₁ SiLU(h) + c_i(τ)) → SiLU → Linear.

    Input and output dimension is prod(data_shape); the output has y's shape. Every block gets its own
    shift c_i of the time embedding (sinusoid of ``time_scale · τ`` → MLP), computed for all blocks by
    one matmul. The last layer starts at zero, so the network outputs exactly 0 before training.
    ``fourier_features: [min_exp, max_exp]`` feeds VDM's Fourier features of y in beside it.
    """

    def __init__(
        self,
        data_shape: tuple[int, ...],
        hidden: int = 128,
        depth: int = 3,
        embed_dim: int = 64,
        time_scale: float = 999.0,
        fourier_features: tuple[int, int] | None = None,
    ):
        super().__init__()
        require(len(data_shape) >= 1 and all(d >= 1 for d in data_shape), "data_shape",
                f"must be a non-empty shape of positive sizes, got {data_shape}")
        require(hidden >= 1, "hidden", f"must be positive, got {hidden}")
        require(depth >= 1, "depth", f"must be at least 1, got {depth}")
        require(embed_dim >= 2, "embed_dim", f"must be at least 2, got {embed_dim}")
        require(time_scale > 0, "time_scale", f"must be positive, got {time_scale}")
        dim = math.prod(data_shape)
        self.data_shape = tuple(data_shape)
        self.depth = depth
        self.time_embedding = TimeEmbedding(embed_dim, hidden, hidden, time_scale)
        self.time_shifts = nn.Linear(hidden, depth * hidden)
        self.features = FourierFeatures(fourier_features) if fourier_features is not None else nn.Identity()
        self.input = nn.Linear(self.features.channels(dim) if fourier_features else dim, hidden)
        self.fc1 = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.fc2 = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.output = nn.Linear(hidden, dim)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, y: Tensor, tau: Tensor) -> Tensor:
        batch = y.shape[0]
        temb = self.time_embedding(tau, batch)
        shifts = self.time_shifts(F.silu(temb)).chunk(self.depth, dim=1)
        h = self.input(self.features(y.reshape(batch, -1)))
        for fc1, fc2, shift in zip(self.fc1, self.fc2, shifts, strict=True):
            h = h + fc2(F.silu(fc1(F.silu(h)) + shift))
        return self.output(F.silu(h)).reshape(y.shape)
