"""What the network's output means: the drift a, the score s, the noise ε or the velocity v (MATH.md §2)."""

from __future__ import annotations

from torch import Tensor

from sdeflow.plugin import Parameterization, bcast, hookimpl


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
    """DDPM's ε-prediction: ε̂ = n(y, t), s = −ε̂ / σ(t), a = −g ε̂ / σ(t). Any error in ε̂ is divided by σ → 0,
    so the ELBO integrand is unbounded as t → 0 (MATH.md §13): it needs a bound from t_ε (§15)."""

    bounded_at_zero = False

    def noise(self, y: Tensor, t: Tensor) -> Tensor:
        return self.net(y, t)

    def score(self, y: Tensor, t: Tensor) -> Tensor:
        return -self.noise(y, t) / bcast(self.sde.sigma(t), y)

    def drift(self, y: Tensor, t: Tensor) -> Tensor:
        return bcast(self.sde.g(t), y) * self.score(y, t)


class Velocity(Parameterization):
    """v-prediction (Salimans & Ho 2022): v̂ = n(y, t) for v = m ε − σ x, y = m x + σ ε. The pair (y, v) is
    (x, ε) rotated and scaled by m² + σ² (1 for VP), so ε̂ = (σ y + m v̂)/(m² + σ²), x̂ = (m y − σ v̂)/(m² + σ²),
    s = −ε̂/σ and a = g s (MATH.md §2). Like ``noise``, unbounded as t → 0 (MATH.md §13)."""

    bounded_at_zero = False

    def velocity(self, y: Tensor, t: Tensor) -> Tensor:
        return self.net(y, t)

    def noise(self, y: Tensor, t: Tensor) -> Tensor:
        m, sigma = bcast(self.sde.m(t), y), bcast(self.sde.sigma(t), y)
        return (sigma * y + m * self.velocity(y, t)) / (m**2 + sigma**2)

    def data(self, y: Tensor, t: Tensor) -> Tensor:
        m, sigma = bcast(self.sde.m(t), y), bcast(self.sde.sigma(t), y)
        return (m * y - sigma * self.velocity(y, t)) / (m**2 + sigma**2)

    def score(self, y: Tensor, t: Tensor) -> Tensor:
        return -self.noise(y, t) / bcast(self.sde.sigma(t), y)

    def drift(self, y: Tensor, t: Tensor) -> Tensor:
        return bcast(self.sde.g(t), y) * self.score(y, t)


@hookimpl
def sdeflow_register_parameterizations(register):
    register("drift", Drift)
    register("score", Score)
    register("noise", Noise)
    register("velocity", Velocity)
