"""Time proposals for evaluating the ELBO: stratified t and a density fitted to the integrand.

Both are :class:`TimeSampler` s, so every estimator (MATH.md §5, §9) takes them unchanged, and both keep
the estimate unbiased: it is ∫ f dt estimated by f(t)/q(t) with q the density the draws really have.

- :class:`Stratified` draws the K samples of one example at u_k = (k + u)/K, k = 0 … K−1, one u per
  example, through the base sampler's inverse CDF (as VDM does). Each t_k has density K q on its own
  stratum, so the average over the K samples of f(t_k)/q(t_k) is unbiased; the K draws are not
  independent, which is the point: the t-to-t variation of E[f | t]/q mostly cancels.
- :class:`FittedProposal`: q = α q_fit + (1 − α) q_lik, where q_fit is piecewise constant on log-t bins
  over [t_ε, T] (plus one bin [0, t_ε]) with mass ∝ √(bin width · mean of f² over the bin), the
  minimiser of E[(f/q)²] among such densities, estimated on a pilot pass; q_lik is the SDE's likelihood
  density (the debiased sampler's, MATH.md §6), which keeps q positive everywhere. Its CDF is tabulated
  on a fine grid, and the density reported is the slope of the interpolated CDF: exactly the density
  of the draws, whatever the grid.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.errors import InvalidArgument
from ..core.interfaces import SDE, TimeSampler

PROPOSAL_MIX = 0.5
"""α, the weight of the fitted part; the rest is the likelihood (debiased) density."""
CELLS_PER_BIN = 64
"""Grid cells per log-t bin for the tabulated CDF of the mixture."""


def uniform_u(n: int, device, generator) -> Tensor:
    """u ~ U(0, 1] in float64: never exactly 0, so no t is exactly 0."""
    return 1.0 - torch.rand(n, generator=generator, device=device, dtype=torch.float64)


def has_inverse_cdf(sampler: TimeSampler) -> bool:
    """Whether the sampler implements ``sample_u`` (the interface's default only raises)."""
    return type(sampler).sample_u is not TimeSampler.sample_u


def require_inverse_cdf(sampler: TimeSampler, argument: str, why: str) -> None:
    if not has_inverse_cdf(sampler):
        raise InvalidArgument(argument, f"time sampler {type(sampler).__name__} has no inverse CDF "
                              f"(TimeSampler.sample_u), which {why} needs")


def stratified_u(blocks: int, k: int, device, generator) -> Tensor:
    """u_{b,k} = (k + u_b)/K in (0, 1], block-major: K consecutive values per block, one u_b each."""
    u = uniform_u(blocks, device, generator)
    offsets = torch.arange(k, device=device, dtype=torch.float64)
    return ((offsets[None, :] + u[:, None]) / k).reshape(-1)


class Stratified(TimeSampler):
    """The base sampler's inverse CDF at stratified u: draw i·K + k of n = B·K is in stratum k of block i.

    The estimators lay out the K samples of each example consecutively (``repeat_interleave``), so a
    block is one example. q(t) is the base density: averaging f/q over each block is unbiased.
    """

    def __init__(self, base: TimeSampler, samples: int):
        require_inverse_cdf(base, "stratify_time", "stratified time")
        self.base, self.samples = base, samples

    def density(self, sde: SDE, t: Tensor) -> Tensor:
        return self.base.density(sde, t)

    def sample(self, sde: SDE, n: int, *, device=None, generator=None) -> tuple[Tensor, Tensor]:
        if n % self.samples:
            raise ValueError(f"Stratified: {n} draws are not blocks of {self.samples}")
        return self.base.sample_u(sde, stratified_u(n // self.samples, self.samples, device, generator))

    def sample_u(self, sde: SDE, u: Tensor) -> tuple[Tensor, Tensor]:
        return self.base.sample_u(sde, u)


class LikelihoodDensity(TimeSampler):
    """t ~ the SDE's likelihood density q ∝ r(max(t, t_ε)) (MATH.md §6): the pilot pass's sampler."""

    def density(self, sde: SDE, t: Tensor) -> Tensor:
        return sde.likelihood_time_density.pdf(t)

    def sample(self, sde: SDE, n: int, *, device=None, generator=None) -> tuple[Tensor, Tensor]:
        return self.sample_u(sde, uniform_u(n, device, generator))

    def sample_u(self, sde: SDE, u: Tensor) -> tuple[Tensor, Tensor]:
        density = sde.likelihood_time_density
        t = density.icdf(u)
        return t, density.pdf(t)


def log_time_edges(sde: SDE, bins: int) -> Tensor:
    """0, t_ε and ``bins`` − 1 log-spaced intervals up to T: ``bins`` bins, float64."""
    tail = torch.logspace(math.log10(sde.t_eps), math.log10(sde.T), bins, dtype=torch.float64)
    return torch.cat([torch.zeros(1, dtype=torch.float64), tail])


def bin_index(edges: Tensor, t: Tensor) -> Tensor:
    """The bin of each t: 0 for [0, t_ε], then the log bins; t = T falls in the last."""
    i = torch.searchsorted(edges.to(t.device), t.to(torch.float64).contiguous(), right=True) - 1
    return i.clamp(0, len(edges) - 2)


def bin_masses(edges: Tensor, t: Tensor, q0: Tensor, square: Tensor) -> Tensor:
    """Masses ∝ √(width_j · I_j), I_j = ∫_bin M dt ≈ mean over draws t ~ q₀ of 1_j square/q₀, where
    ``square`` is an unbiased estimate of M(t) per draw (f² for E[f² | t]): the piecewise-constant
    proposal minimising ∫ M/q (q_j ∝ √(I_j / width_j))."""
    bins = len(edges) - 1
    i = bin_index(edges, t).cpu()
    second = torch.zeros(bins, dtype=torch.float64).index_add_(0, i, (square.double() / q0.double()).cpu())
    mass = (second.clamp(min=0) / t.numel() * edges.diff()).sqrt()
    return mass / mass.sum() if float(mass.sum()) > 0 else edges.diff() / float(edges[-1])


class FittedProposal(TimeSampler):
    """q = α · (piecewise constant with bin masses ``mass``) + (1 − α) · likelihood density (module doc)."""

    def __init__(self, sde: SDE, edges: Tensor, mass: Tensor, mix: float = PROPOSAL_MIX):
        self.edges, self.mass, self.mix = edges.double(), mass.double() / mass.double().sum(), mix
        widths = self.edges.diff()
        cells = [torch.linspace(float(lo), float(hi), CELLS_PER_BIN + 1, dtype=torch.float64)[:-1]
                 for lo, hi in zip(self.edges[:-1], self.edges[1:], strict=True)]
        knots = torch.cat([*cells, self.edges[-1:]])
        fitted_cdf = torch.cat([torch.zeros(1, dtype=torch.float64), self.mass.cumsum(0)])
        i = bin_index(self.edges, knots)
        within = ((knots - self.edges[i]) / widths[i]).clamp(0, 1)
        fitted = fitted_cdf[i] + self.mass[i] * within
        cum = mix * fitted + (1 - mix) * sde.likelihood_time_density.cdf(knots)
        cum = cum / cum[-1]
        self.knots, self.cum = knots, cum
        self._on_device: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _table(self, like: Tensor) -> tuple[Tensor, Tensor]:
        if like.device not in self._on_device:
            self._on_device[like.device] = (self.knots.to(like.device), self.cum.to(like.device))
        return self._on_device[like.device]

    def density(self, sde: SDE, t: Tensor) -> Tensor:
        knots, cum = self._table(t)
        i = torch.searchsorted(knots, t.to(torch.float64).contiguous(), right=True).clamp(1, len(knots) - 1)
        return ((cum[i] - cum[i - 1]) / (knots[i] - knots[i - 1])).to(t.dtype)

    def cdf(self, t: Tensor) -> Tensor:
        knots, cum = self._table(t)
        return _interp(t.to(torch.float64).clamp(0, float(knots[-1])), knots, cum)

    def sample(self, sde: SDE, n: int, *, device=None, generator=None) -> tuple[Tensor, Tensor]:
        return self.sample_u(sde, uniform_u(n, device, generator))

    def sample_u(self, sde: SDE, u: Tensor) -> tuple[Tensor, Tensor]:
        knots, cum = self._table(u)
        i = torch.searchsorted(cum, u.to(torch.float64).contiguous(), right=True).clamp(1, len(knots) - 1)
        t = knots[i - 1] + (knots[i] - knots[i - 1]) * (u - cum[i - 1]) / (cum[i] - cum[i - 1])
        # The slope of the cell the draw fell in: exactly the density of the draws.
        return t, (cum[i] - cum[i - 1]) / (knots[i] - knots[i - 1])

    def to_json(self) -> dict:
        return {"edges": self.edges.tolist(), "mass": self.mass.tolist(), "mix": self.mix}


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    i = torch.searchsorted(xp, x.contiguous(), right=True).clamp(1, len(xp) - 1)
    return fp[i - 1] + (fp[i] - fp[i - 1]) * (x - xp[i - 1]) / (xp[i] - xp[i - 1])
