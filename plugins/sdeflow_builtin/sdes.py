"""Forward (inference) SDEs: VP (the paper's default), sub-VP and VE (MATH.md §1)."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from sdeflow.errors import require
from sdeflow.hookspecs import hookimpl
from sdeflow.interfaces import SDE, TimeDensity, bcast, gaussian_log_prob


def _check_time(T: float, t_eps: float) -> None:
    require(T > 0, "T", f"must be positive, got {T}")
    require(0 < t_eps < T, "t_eps", f"must be in (0, T={T}), got {t_eps}")


class _LinearBeta(SDE):
    """Shared by VP and sub-VP: β(t) = β_min + (β_max − β_min) t and B(t) = ∫₀ᵗ β."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, T: float = 1.0, t_eps: float = 1e-3):
        require(beta_min > 0, "beta_min", f"must be positive, got {beta_min}")
        require(beta_max >= beta_min, "beta_max", f"must be ≥ beta_min={beta_min}, got {beta_max}")
        _check_time(T, t_eps)
        self.beta_min, self.beta_max, self.T, self.t_eps = beta_min, beta_max, T, t_eps

    def beta(self, t: Tensor) -> Tensor:
        """β(t) = β_min + (β_max − β_min) t."""
        return self.beta_min + (self.beta_max - self.beta_min) * t

    def B(self, t: Tensor) -> Tensor:
        """B(t) = β_min t + ½ (β_max − β_min) t²."""
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def f(self, y: Tensor, t: Tensor) -> Tensor:
        """f(y, t) = −½ β(t) y."""
        return -0.5 * bcast(self.beta(t), y) * y

    def linear_drift(self, t: Tensor) -> Tensor:
        """κ(t) = −½ β(t)."""
        return -0.5 * self.beta(t)

    def prior_std(self) -> float:
        return 1.0

    def m(self, t: Tensor) -> Tensor:
        """m(t) = exp(−½ B(t))."""
        return torch.exp(-0.5 * self.B(t))

    def prior_sample(self, shape, *, generator=None, device=None, dtype=None) -> Tensor:
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def prior_log_prob(self, y: Tensor) -> Tensor:
        return gaussian_log_prob(y)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(beta_min={self.beta_min}, beta_max={self.beta_max}, T={self.T})"


class VPSDE(_LinearBeta):
    """Variance-preserving SDE: g = √β, σ² = 1 − e^{−B}, prior N(0, I) (MATH.md §1)."""

    def g(self, t: Tensor) -> Tensor:
        return torch.sqrt(self.beta(t))

    def sigma(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(-self.B(t)))

    @functools.cached_property
    def likelihood_time_density(self) -> TimeDensity:
        """Closed form (MATH.md §6), built once per SDE."""
        return VPLikelihoodTimeDensity(self)


class SubVPSDE(_LinearBeta):
    """sub-VP SDE (Song et al. 2021): g² = β (1 − e^{−2B}), σ = 1 − e^{−B} (MATH.md §1)."""

    def g(self, t: Tensor) -> Tensor:
        return torch.sqrt(self.beta(t) * -torch.expm1(-2 * self.B(t)))

    def sigma(self, t: Tensor) -> Tensor:
        return -torch.expm1(-self.B(t))


class VESDE(SDE):
    """Variance-exploding SDE: f = 0, σ(t) = σ_min (σ_max/σ_min)^t, g² = dσ²/dt (MATH.md §1).

    As in Song et al., Y_t | x is taken as N(x, σ(t)² I), i.e. the data carry σ_min noise at t = 0.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, T: float = 1.0, t_eps: float = 1e-3):
        require(sigma_min > 0, "sigma_min", f"must be positive, got {sigma_min}")
        require(sigma_max > sigma_min, "sigma_max", f"must be > sigma_min={sigma_min}, got {sigma_max}")
        _check_time(T, t_eps)
        self.sigma_min, self.sigma_max, self.T, self.t_eps = sigma_min, sigma_max, T, t_eps
        self.log_ratio = math.log(sigma_max / sigma_min)

    def f(self, y: Tensor, t: Tensor) -> Tensor:
        return torch.zeros_like(y)

    def linear_drift(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def prior_std(self) -> float:
        return self.sigma_max

    def g(self, t: Tensor) -> Tensor:
        """g = σ(t) √(2 log(σ_max/σ_min) / T)."""
        return self.sigma(t) * math.sqrt(2 * self.log_ratio / self.T)

    def m(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_min * torch.exp(self.log_ratio * t / self.T)

    def prior_sample(self, shape, *, generator=None, device=None, dtype=None) -> Tensor:
        return self.sigma_max * torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def prior_log_prob(self, y: Tensor) -> Tensor:
        return gaussian_log_prob(y, self.sigma_max)

    def __repr__(self) -> str:
        return f"VESDE(sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, T={self.T})"


class VPLikelihoodTimeDensity(TimeDensity):
    """q(t) = r(max(t, t_ε)) / Z for VP, r = β/σ², in closed form (MATH.md §6).

    F(t) = log(e^{B(t)} − 1) has F′ = r, so the CDF and its inverse need no table.
    Computed in float64 with the SDE's own β_min, β_max, T and t_ε.
    """

    def __init__(self, sde: VPSDE):
        self.sde = sde
        eps = torch.tensor(sde.t_eps, dtype=torch.float64)
        self.r_eps = float(sde.likelihood_weight(eps))
        self.F_eps = float(self.F(eps))
        self.head = sde.t_eps * self.r_eps  # mass of the flat part on [0, t_ε]
        self.Z = self.head + float(self.F(torch.tensor(sde.T, dtype=torch.float64))) - self.F_eps

    def F(self, t: Tensor) -> Tensor:
        """F(t) = log(e^{B(t)} − 1), stable for small and large B."""
        B = self.sde.B(t)
        return B + torch.log(-torch.expm1(-B))

    def pdf(self, t: Tensor) -> Tensor:
        t64 = t.to(torch.float64)
        return (self.sde.likelihood_weight(t64.clamp(min=self.sde.t_eps)) / self.Z).to(t.dtype)

    def cdf(self, t: Tensor) -> Tensor:
        t64 = t.to(torch.float64).clamp(0, self.sde.T)
        flat = t64 * self.r_eps
        tail = self.head + self.F(t64.clamp(min=self.sde.t_eps)) - self.F_eps
        return (torch.where(t64 <= self.sde.t_eps, flat, tail) / self.Z).to(t.dtype)

    def icdf(self, u: Tensor) -> Tensor:
        u64 = u.to(torch.float64)
        flat = self.Z * u64 / self.r_eps
        B_star = torch.nn.functional.softplus(self.Z * u64 - self.head + self.F_eps)
        t_tail = self._t_of_B(B_star)
        return torch.where(u64 * self.Z <= self.head, flat, t_tail).clamp(0, self.sde.T).to(u.dtype)

    def _t_of_B(self, B: Tensor) -> Tensor:
        """Solve β_min t + ½ (β_max − β_min) t² = B; written so β_max = β_min needs no special case."""
        b0, db = self.sde.beta_min, self.sde.beta_max - self.sde.beta_min
        return 2 * B / (b0 + torch.sqrt(b0**2 + 2 * db * B))


@hookimpl
def sdeflow_register_sdes(register):
    register("vp", VPSDE)
    register("subvp", SubVPSDE)
    register("ve", VESDE)
