"""A variance-preserving SDE with a constant noise rate β (MATH.md §1 with β_min = β_max = β)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sdeflow.errors import require
from sdeflow.interfaces import SDE, gaussian_log_prob


class ConstantBetaVP(SDE):
    """VP SDE with constant β: f = −½βy, g = √β, m = e^{−βt/2}, σ² = 1 − e^{−βt}, prior N(0, I).

    It defines no closed-form time density, so the kernel's tabulated one is used for
    likelihood-weighted time sampling.
    """

    def __init__(self, beta: float = 5.0, T: float = 1.0, t_eps: float = 1e-3):
        require(beta > 0, "beta", f"must be positive, got {beta}")
        require(T > 0, "T", f"must be positive, got {T}")
        require(0 < t_eps < T, "t_eps", f"must be in (0, T) = (0, {T}), got {t_eps}")
        self.beta = float(beta)
        self.T = float(T)
        self.t_eps = float(t_eps)

    def f(self, y: Tensor, t: Tensor) -> Tensor:
        return -0.5 * self.beta * y

    def g(self, t: Tensor) -> Tensor:
        return torch.full_like(t, math.sqrt(self.beta))

    def m(self, t: Tensor) -> Tensor:
        return torch.exp(-0.5 * self.beta * t)

    def sigma(self, t: Tensor) -> Tensor:
        # −expm1 keeps σ accurate for the tiny t near t_ε, where 1 − exp(−βt) would lose digits.
        return torch.sqrt(-torch.expm1(-self.beta * t))

    def prior_sample(self, shape: tuple[int, ...], *, generator=None, device=None, dtype=None) -> Tensor:
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def prior_log_prob(self, y: Tensor) -> Tensor:
        return gaussian_log_prob(y)

    def __repr__(self) -> str:
        return f"ConstantBetaVP(beta={self.beta}, T={self.T}, t_eps={self.t_eps})"
