"""Time samplers returning (t, q(t)): uniform, and the paper's debiased importance sampler (MATH.md §6)."""

from __future__ import annotations

import torch
from torch import Tensor

from sdeflow.hookspecs import hookimpl
from sdeflow.interfaces import SDE, TimeSampler


def _u(n: int, device, generator) -> Tensor:
    """u ~ U(0, 1]: never exactly 0, so no t is exactly 0 (σ(0) = 0 would divide by zero)."""
    return 1.0 - torch.rand(n, generator=generator, device=device, dtype=torch.float64)


class Uniform(TimeSampler):
    """t ~ U(0, T], q(t) = 1/T (the reference code's ``--debias=False``)."""

    def density(self, sde: SDE, t: Tensor) -> Tensor:
        return torch.full_like(t, 1.0 / sde.T)

    def sample(self, sde: SDE, n: int, *, device=None, generator=None) -> tuple[Tensor, Tensor]:
        return self.sample_u(sde, _u(n, device, generator))

    def sample_u(self, sde: SDE, u: Tensor) -> tuple[Tensor, Tensor]:
        t = (sde.T * u).float()
        return t, self.density(sde, t)


class Debiased(TimeSampler):
    """t ~ q(t) ∝ g²/σ² truncated below t_ε, by inverse CDF (MATH.md §6; ``--debias=True``).

    Uses the SDE's own density: closed form where the SDE has one, else the kernel's table.
    """

    def density(self, sde: SDE, t: Tensor) -> Tensor:
        return sde.likelihood_time_density.pdf(t)

    def sample(self, sde: SDE, n: int, *, device=None, generator=None) -> tuple[Tensor, Tensor]:
        return self.sample_u(sde, _u(n, device, generator))

    def sample_u(self, sde: SDE, u: Tensor) -> tuple[Tensor, Tensor]:
        density = sde.likelihood_time_density
        t = density.icdf(u)
        return t.float(), density.pdf(t).float()


@hookimpl
def sdeflow_register_time_samplers(register):
    register("uniform", Uniform)
    register("debiased", Debiased)
