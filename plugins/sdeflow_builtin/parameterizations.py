"""What the network's output means: the drift a, the score s or the noise ε (MATH.md §2)."""

from __future__ import annotations

from torch import Tensor

from sdeflow.hookspecs import hookimpl
from sdeflow.interfaces import Parameterization, bcast


class Drift(Parameterization):
    """The paper's choice: a = n(y, t), s = a / g."""

    def drift(self, y: Tensor, t: Tensor) -> Tensor:
        return self.net(y, t)

    def score(self, y: Tensor, t: Tensor) -> Tensor:
        return self.drift(y, t) / bcast(self.sde.g(t), y)


class Score(Parameterization):
    """Song et al.: s = n(y, t), a = g s."""

    def score(self, y: Tensor, t: Tensor) -> Tensor:
        return self.net(y, t)

    def drift(self, y: Tensor, t: Tensor) -> Tensor:
        return bcast(self.sde.g(t), y) * self.score(y, t)


class Noise(Parameterization):
    """DDPM's ε-prediction: ε̂ = n(y, t), s = −ε̂ / σ(t), a = −g ε̂ / σ(t)."""

    def noise(self, y: Tensor, t: Tensor) -> Tensor:
        return self.net(y, t)

    def score(self, y: Tensor, t: Tensor) -> Tensor:
        return -self.noise(y, t) / bcast(self.sde.sigma(t), y)

    def drift(self, y: Tensor, t: Tensor) -> Tensor:
        return bcast(self.sde.g(t), y) * self.score(y, t)


@hookimpl
def sdeflow_register_parameterizations(register):
    register("drift", Drift)
    register("score", Score)
    register("noise", Noise)
