"""Data transforms and the bits-per-dimension conversion, in one place for every data set (MATH.md §5)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .errors import require
from .interfaces import DataTransform, flat_sum


class Identity(DataTransform):
    """Continuous data the model sees as it is: z = x, log-det 0, no bits offset."""

    def forward(self, x: Tensor, *, generator=None) -> tuple[Tensor, Tensor]:
        return x, x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        return z

    def protocol(self) -> dict[str, Any]:
        return {"transform": "identity", "dequantization": "none (continuous data)", "log_det": 0.0,
                "bits_offset": 0.0}


class Dequantize(DataTransform):
    """x ∈ {0..L−1}/(L−1) → x̃ = x (L−1)/L + u/L, u ~ U[0,1)^D, then optionally logit(α + (1 − 2α) x̃).

    ``bits_offset`` = log₂ L turns a density on [0, 1)^D into probabilities of the L-level bins.
    """

    def __init__(self, logit_alpha: float | None = 0.05, levels: int = 256):
        require(logit_alpha is None or 0 <= logit_alpha < 0.5, "logit_alpha", "must be in [0, 0.5)")
        require(levels >= 2, "levels", "must be at least 2")
        self.alpha = logit_alpha
        self.levels = levels
        self.bits_offset = math.log2(levels)

    def dequantize(self, x: Tensor, *, generator=None) -> Tensor:
        """x̃ = x (L−1)/L + u/L."""
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return (x * (self.levels - 1) + u) / self.levels

    def forward(self, x: Tensor, *, generator=None) -> tuple[Tensor, Tensor]:
        x_tilde = self.dequantize(x, generator=generator)
        if self.alpha is None:
            return x_tilde, x.new_zeros(x.shape[0])
        return logit_transform(x_tilde, self.alpha)

    def protocol(self) -> dict[str, Any]:
        L = self.levels
        return {"transform": "dequantize" + ("" if self.alpha is None else " + logit"),
                "dequantization": f"uniform: x~ = (x*{L - 1} + u)/{L}, u ~ U[0,1)^D, one draw per example",
                "logit_alpha": self.alpha,
                "log_det": "included: bpd is of x~ in [0,1)^D" if self.alpha is not None else 0.0,
                "bits_offset": self.bits_offset}

    def inverse(self, z: Tensor) -> Tensor:
        if self.alpha is None:
            return z.clamp(0, 1)
        return ((torch.sigmoid(z) - self.alpha) / (1 - 2 * self.alpha)).clamp(0, 1)


def logit_transform(x: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """z = logit(s), s = α + (1 − 2α) x; log|det| = Σ_d [log(1 − 2α) − log(s_d (1 − s_d))] (MATH.md §5)."""
    s = alpha + (1 - 2 * alpha) * x
    z = torch.log(s) - torch.log1p(-s)
    log_det = flat_sum(math.log(1 - 2 * alpha) - torch.log(s) - torch.log1p(-s))
    return z, log_det


def bits_per_dim(log_likelihood_z: Tensor, log_det: Tensor, dim: int, bits_offset: float) -> Tensor:
    """bpd = −(log p(z) + log|det ∂z/∂x̃|) / (D ln 2) + offset (MATH.md §5), per example."""
    return -(log_likelihood_z + log_det) / (dim * math.log(2)) + bits_offset


def mean_and_se(values: Tensor) -> tuple[float, float]:
    """Mean and its standard error std / √N (N = 1 gives a standard error of 0)."""
    values = values.double()
    n = values.numel()
    se = float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0
    return float(values.mean()), se
