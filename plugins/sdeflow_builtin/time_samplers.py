"""Time samplers returning (t, q(t)): uniform, the paper's debiased importance sampler (MATH.md §6) and
uniform in log-SNR (MATH.md §13)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sdeflow.plugin import (
    SDE,
    InvalidArgument,
    LikelihoodDensity,
    TabulatedTimeDensity,
    TimeDensity,
    TimeSampler,
    derived,
    hookimpl,
    uniform_u,
)


class Uniform(TimeSampler):
    """t ~ U(0, T], q(t) = 1/T (the reference code's ``--debias=False``)."""

    def density(self, sde: SDE, t: Tensor) -> Tensor:
        return torch.full_like(t, 1.0 / sde.T)

    def sample(self, sde: SDE, n: int, *, device=None, generator=None) -> tuple[Tensor, Tensor]:
        return self.sample_u(sde, uniform_u(n, device, generator))

    def sample_u(self, sde: SDE, u: Tensor) -> tuple[Tensor, Tensor]:
        t = (sde.T * u).float()
        return t, self.density(sde, t)


class Debiased(LikelihoodDensity):
    """t ~ q(t) ∝ g²/σ² truncated below t_ε, by inverse CDF (MATH.md §6; ``--debias=True``): the kernel's
    likelihood-density sampler (the estimators' pilot pass draws from it too), in float32.

    Uses the SDE's own density: closed form where the SDE has one, else the kernel's table.
    """

    def sample_u(self, sde: SDE, u: Tensor) -> tuple[Tensor, Tensor]:
        t, q = super().sample_u(sde, u)
        return t.float(), q.float()


def log_snr(sde: SDE, t: Tensor) -> Tensor:
    """λ(t) = log(m(t)² / σ(t)²)."""
    return 2 * (torch.log(sde.m(t)) - torch.log(sde.sigma(t)))


@torch.no_grad()
def log_snr_density(sde: SDE, points: int = 4001) -> TabulatedTimeDensity:
    """q(t) ∝ −λ′(t) on [t_ε, T], continued flat below t_ε at q(t_ε) (as ``debiased`` is), from λ on
    log-spaced knots: the CDF is (head + λ(t_ε) − λ(t)) / Z, exact at the knots, linear between them."""
    knots = torch.logspace(math.log10(sde.t_eps), math.log10(sde.T), points, dtype=torch.float64)
    lam = log_snr(sde, knots).to(torch.float64)
    if not bool((lam.diff() < 0).all()):
        raise InvalidArgument("time_sampler", f"log_snr needs a log-SNR that falls with t; {sde!r}'s does not")
    head = sde.t_eps * float((lam[0] - lam[1]) / (knots[1] - knots[0]))  # t_ε × q(t_ε), unnormalised
    mass = torch.cat([torch.zeros(1, dtype=torch.float64), head + (lam[0] - lam)])
    return TabulatedTimeDensity.from_mass(torch.cat([torch.zeros(1, dtype=torch.float64), knots]), mass, sde.T)


class ClosedFormLogSNRDensity(TimeDensity):
    """q(t) ∝ −λ′(t) on [t_ε, T], flat at q(t_ε) below, for an SDE that inverts its log-SNR in closed form
    (``log_snr_inverse``: VP, sub-VP): the CDF is (head + λ(t_ε) − λ(t)) / Z exactly, t = λ⁻¹ of a uniform λ."""

    def __init__(self, sde: SDE):
        self.sde = sde
        ends = torch.tensor([sde.t_eps, sde.T], dtype=torch.float64)
        self.lam_eps, self.lam_T = log_snr(sde, ends).tolist()
        self.q_eps = float(self.slope(ends[:1]))
        self.head = sde.t_eps * self.q_eps
        self.Z = self.head + self.lam_eps - self.lam_T

    def slope(self, t: Tensor) -> Tensor:
        """−λ′(t), by autograd in float64."""
        with torch.enable_grad():
            t = t.detach().to(torch.float64).requires_grad_(True)
            (grad,) = torch.autograd.grad(log_snr(self.sde, t).sum(), t)
        return -grad

    def pdf(self, t: Tensor) -> Tensor:
        t64 = t.to(torch.float64)
        return (self.slope(t64.clamp(min=self.sde.t_eps, max=self.sde.T)) / self.Z).to(t.dtype)

    def cdf(self, t: Tensor) -> Tensor:
        t64 = t.to(torch.float64).clamp(0, self.sde.T)
        above = self.head + self.lam_eps - log_snr(self.sde, t64.clamp(min=self.sde.t_eps))
        return (torch.where(t64 < self.sde.t_eps, t64 * self.q_eps, above) / self.Z).to(t.dtype)

    def icdf(self, u: Tensor) -> Tensor:
        mass = u.to(torch.float64).clamp(0, 1) * self.Z
        lam = self.lam_eps - (mass - self.head).clamp(min=0)
        t = torch.where(mass <= self.head, mass / self.q_eps, self.sde.log_snr_inverse(lam))
        return t.clamp(0, self.sde.T).to(u.dtype)


class LogSNR(TimeSampler):
    """t uniform in log-SNR λ = log(m²/σ²) between λ(T) and λ(t_ε) (Kingma et al. 2021; Kingma & Gao 2023),
    in closed form where the SDE inverts λ (``log_snr_inverse``: VP, sub-VP), else by numeric inversion,
    with a flat head on [0, t_ε] so every weighting on [0, T] stays unbiased. For VP, −λ′ = g²/σ², so
    above t_ε this is the likelihood weighting's own density."""

    def density_of(self, sde: SDE) -> TimeDensity:
        """The SDE's log-SNR density, built once and again when its parameters change."""
        exact = hasattr(sde, "log_snr_inverse")  # an optional SDE method, like linear_drift
        return derived(sde, "_log_snr_density", lambda: ClosedFormLogSNRDensity(sde) if exact else log_snr_density(sde))

    def density(self, sde: SDE, t: Tensor) -> Tensor:
        return self.density_of(sde).pdf(t)

    def sample(self, sde: SDE, n: int, *, device=None, generator=None) -> tuple[Tensor, Tensor]:
        return self.sample_u(sde, uniform_u(n, device, generator))

    def sample_u(self, sde: SDE, u: Tensor) -> tuple[Tensor, Tensor]:
        density = self.density_of(sde)
        t = density.icdf(u)
        return t.float(), density.pdf(t).float()


@hookimpl
def sdeflow_register_time_samplers(register):
    register("uniform", Uniform)
    register("debiased", Debiased)
    register("log_snr", LogSNR)
