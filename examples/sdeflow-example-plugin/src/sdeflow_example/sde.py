"""Variance-preserving SDEs with a constant noise rate β (MATH.md §1 with β_min = β_max = β): a fixed one,
and one whose β is a trainable parameter (an SDE that is also an ``nn.Module``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdeflow.plugin import SDE, gaussian_log_prob, require


def check_arguments(beta: float, T: float, t_eps: float) -> None:
    require(beta > 0, "beta", f"must be positive, got {beta}")
    require(T > 0, "T", f"must be positive, got {T}")
    require(0 < t_eps < T, "t_eps", f"must be in (0, T) = (0, {T}), got {t_eps}")


class ConstantBetaVP(SDE):
    """VP SDE with constant β: f = −½βy, g = √β, m = e^{−βt/2}, σ² = 1 − e^{−βt}, prior N(0, I).

    It defines no closed-form time density, so the kernel's tabulated one is used for
    likelihood-weighted time sampling.
    """

    def __init__(self, beta: float = 5.0, T: float = 1.0, t_eps: float = 1e-3):
        check_arguments(beta, T, t_eps)
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


class LearnedBetaVP(nn.Module, ConstantBetaVP):
    """ConstantBetaVP with β = softplus(ρ) learned: being an ``nn.Module`` with a parameter is all it takes
    for the kernel to train it (with a loss that bounds the likelihood, e.g. ``loss: {name: elbo}``),
    average it in the EMA, all-reduce it under DDP and save it in checkpoints."""

    def __init__(self, beta: float = 5.0, T: float = 1.0, t_eps: float = 1e-3):
        check_arguments(beta, T, t_eps)
        nn.Module.__init__(self)
        self.T, self.t_eps = float(T), float(t_eps)
        self.rho = nn.Parameter(torch.tensor(math.log(math.expm1(beta))))  # softplus(ρ) = β at the start

    @property
    def beta(self) -> Tensor:
        return F.softplus(self.rho)

    def f(self, y: Tensor, t: Tensor) -> Tensor:
        return -0.5 * self.beta.to(y.dtype) * y

    def g(self, t: Tensor) -> Tensor:
        return torch.sqrt(self.beta.to(t.dtype)).expand_as(t)

    def __repr__(self) -> str:
        return f"LearnedBetaVP(beta={float(self.beta):.4g}, T={self.T}, t_eps={self.t_eps})"
