"""The composed model: SDE + network + parameterization, and the λ-family of plug-in reverse SDEs."""

from __future__ import annotations

from torch import Tensor, nn

from .bounds import PAPER, Bound
from .errors import require
from .interfaces import SDE, Parameterization, bcast


def check_lambda(lam: float) -> None:
    require(0.0 <= lam <= 1.0, "lam", f"must be in [0, 1], got {lam}")


class DiffusionModel(nn.Module):
    """Exposes the drift a, the score s, μ = g a − f, and μ_λ, σ_λ of the plug-in reverse SDEs.

    Losses, samplers and estimators take this object in; only the parameterization holds weights.
    ``bound`` is how its likelihood pays for [0, t_ε] (:mod:`sdeflow.core.bounds`, MATH.md §15): the paper's
    integral to t = 0, or a decoder at t_ε.
    """

    def __init__(self, sde: SDE, parameterization: Parameterization, bound: Bound = PAPER):
        super().__init__()
        self.sde = sde
        self.parameterization = parameterization
        self.bound = bound

    @property
    def network(self) -> nn.Module:
        return self.parameterization.network

    def a(self, y: Tensor, t: Tensor) -> Tensor:
        """The drift a(y, t) (the paper's parameterization)."""
        return self.parameterization.drift(y, t)

    def s(self, y: Tensor, t: Tensor) -> Tensor:
        """The score s(y, t) = a / g."""
        return self.parameterization.score(y, t)

    def mu(self, y: Tensor, t: Tensor) -> Tensor:
        """μ = g a − f: the forward-time drift of the generative SDE (MATH.md §5)."""
        return bcast(self.sde.g(t), y) * self.a(y, t) - self.sde.f(y, t)

    def mu_lambda(self, y: Tensor, t: Tensor, lam: float) -> Tensor:
        """μ_λ = (1 − λ/2) g a − f, the generative drift in reverse time s = T − t (MATH.md §3)."""
        return (1 - lam / 2) * bcast(self.sde.g(t), y) * self.a(y, t) - self.sde.f(y, t)

    def sigma_lambda(self, t: Tensor, lam: float) -> Tensor:
        """σ_λ = √(1 − λ) g (MATH.md §3), shape (B,)."""
        return (1 - lam) ** 0.5 * self.sde.g(t)

    def prior_sample(self, shape, *, generator=None, device=None) -> Tensor:
        return self.sde.prior_sample(shape, generator=generator, device=device)


class GivenScore(Parameterization):
    """A parameterization by a given function s(y, t) instead of a network: a = g s (MATH.md §5)."""

    def __init__(self, sde: SDE, score_fn):
        super().__init__(nn.Identity(), sde)
        self.score_fn = score_fn

    def score(self, y: Tensor, t: Tensor) -> Tensor:
        return self.score_fn(y, t)

    def drift(self, y: Tensor, t: Tensor) -> Tensor:
        return bcast(self.sde.g(t), y) * self.score_fn(y, t)


class ExactScoreModel(DiffusionModel):
    """A model whose score is a given function s(y, t): the oracle for tests and sanity checks."""

    def __init__(self, sde: SDE, score_fn):
        super().__init__(sde, GivenScore(sde, score_fn))
        self.score_fn = score_fn
