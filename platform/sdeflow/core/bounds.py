"""The region below t_ε as a named choice of the bound (MATH.md §15): ``bound: paper | discrete | truncated``.

Every bound on log P(x) here has one shape,

    log P(x) ≥ [the diffusion's bound from t_start]  +  head(x),

    paper      t_start = 0, head 0: the paper's ELBO to t = 0 on the experiment's dequantizer (MATH.md §5, §14)
    discrete   t_start = t_ε, head = E_q[log p(x | y_ε) − log q(y_ε | x)]: VDM's decoder over the levels,
               no dequantization, a probability mass; the diffusion's ELBO of Y_t | x
    truncated  t_start = t_ε, head = D log m(t_ε): log p(x̃) = log p_ε(m x̃) + D log m, the diffusion's ELBO
               from the point m x̃ at t_ε, with i-DODE's truncated-normal dequantization matched to σ/m

so a bound is an object the model carries (``DiffusionModel.bound``): every ELBO estimator, the ELBO
training loss and the ODE read its ``start`` and add its ``head``. The ELBO integrand's draws below
t_start count zero (an unbiased estimate of the integral from t_start, whatever the time sampler).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .errors import SdeflowError
from .interfaces import SDE, DataTransform, Dequantizer, TabulatedTimeDensity, bcast, derived, flat_sum, randn_like
from .transforms import ModelSpace, transform_slope, truncated_normal_draw, truncated_normal_log_q

BOUND_NAMES = ("paper", "discrete", "truncated")

LEVEL_CHUNK = 1 << 22
"""Elements of the (values × levels) table the discrete decoder builds at once."""


def at_t_eps(sde: SDE, like: Tensor) -> tuple[Tensor, Tensor]:
    """(m(t_ε), σ(t_ε)) per example of ``like`` (B, ...), shaped to broadcast against it, in its dtype and
    device (differentiable in a trainable SDE, one time per example)."""
    t = torch.full((like.shape[0],), sde.t_eps, dtype=like.dtype, device=like.device)
    return bcast(sde.m(t), like), bcast(sde.sigma(t), like)


class Bound:
    """The paper's bound (MATH.md §5): the ELBO of the reverse SDE integrated to t = 0, on the experiment's
    dequantizer. Finite only for a parameterization whose integrand is bounded there (drift, score)."""

    name = "paper"
    from_t_eps = False
    """The diffusion term starts at t_ε and :meth:`head` pays for [0, t_ε]."""
    point_start = False
    """The diffusion's ELBO is of the density at t_ε at the point :meth:`start` (through :meth:`view`), not
    of Y_t | x from t = 0 with its draws below t_ε counting zero."""

    def start_time(self, sde: SDE) -> float | None:
        """Draws of t below this count zero (None: the ELBO runs to t = 0)."""
        return sde.t_eps if self.from_t_eps else None

    def head(self, model, z: Tensor, generator=None) -> Tensor:
        """The bound's term for [0, t_start] per example, in nats (0 for the paper's)."""
        return z.new_zeros(z.shape[0])

    def start(self, model, z: Tensor, generator=None) -> Tensor:
        """Where the diffusion starts at t_start: z itself (the paper's, at t = 0)."""
        return z

    def space(self, transform: DataTransform, levels: int | None, dequantizer: Dequantizer | None,
              sde: SDE) -> ModelSpace:
        """How data reach model space under this bound: the experiment's dequantizer (paper)."""
        return ModelSpace(transform, levels, dequantizer if levels is not None else None)

    def protocol(self) -> dict[str, Any]:
        return {"bound": self.name, "below_t_eps": "the reverse SDE's ELBO integrated to t = 0 (MATH.md §5)"}


class Discrete(Bound):
    """VDM's bound for data with levels (MATH.md §15): no dequantization; the diffusion from t_ε, and
    p(x | y_ε) = Π_d softmax_k(−(y_d − m v_k)²/(2σ²)) over the levels' model-space values v_k, at t_ε:

        head = E_{y ~ N(m z, σ² I)}[log p(x | y)] + ½ D log(2πe σ²),

    the second term being −E log q(y_ε | x). The bound is on the probability P(x) itself (no bits offset)."""

    name = "discrete"
    from_t_eps = True

    def __init__(self, values: Tensor):
        self.values = values.double()  # (L,), increasing: the levels in model space

    def head(self, model, z: Tensor, generator=None) -> Tensor:
        m, sigma = at_t_eps(model.sde, z)
        eps = randn_like(z, generator)
        y = m * z + sigma * eps
        entropy = flat_sum(0.5 * math.log(2 * math.pi * math.e) + torch.log(sigma).expand_as(z))
        return flat_sum(-0.5 * eps**2) - self.log_normaliser(y, m, sigma) + entropy

    def log_normaliser(self, y: Tensor, m: Tensor, sigma: Tensor) -> Tensor:
        """Σ_d logsumexp_k −(y_d − m v_k)²/(2σ²) per example, in chunks of the (elements × levels) table."""
        values = self.values.to(device=y.device, dtype=y.dtype)
        flat = y.reshape(-1)
        m_flat, sigma_flat = m.expand_as(y).reshape(-1), sigma.expand_as(y).reshape(-1)
        step = max(1, LEVEL_CHUNK // len(values))
        parts = [torch.logsumexp(-((piece[:, None] - mm[:, None] * values) ** 2) / (2 * ss[:, None] ** 2), dim=1)
                 for piece, mm, ss in zip(flat.split(step), m_flat.split(step), sigma_flat.split(step))]
        return torch.cat(parts).reshape(y.shape[0], -1).sum(dim=1)

    def start(self, model, z: Tensor, generator=None) -> Tensor:
        """A draw y_ε ~ q(y_ε | x) = N(m z, σ² I) (the ODE's start; the ELBO takes Y_t | x, the same process)."""
        m, sigma = at_t_eps(model.sde, z)
        return m * z + sigma * randn_like(z, generator)

    def space(self, transform, levels, dequantizer, sde) -> ModelSpace:
        return DiscreteSpace(transform, levels)

    def protocol(self) -> dict[str, Any]:
        return {"bound": self.name, "below_t_eps": "VDM's discretized decoder p(x | y_t_eps) over the levels; "
                "the diffusion's ELBO from t_eps (MATH.md §15)"}


class Truncated(Bound):
    """i-DODE's bound (MATH.md §15): the density of x̃ is that of the model's Y_{t_ε} at y_ε = m(t_ε) x̃, scaled,
    log p(x̃) = log p_ε(m x̃) + D log m, bounded by the ELBO of the forward process started at that point at
    t_ε (:meth:`view`) or computed by the ODE from there; discrete data are dequantized by a truncated
    normal matched to σ(t_ε)/m(t_ε), so m x̃ looks like the data the model sees at t_ε."""

    name = "truncated"
    from_t_eps = True
    point_start = True

    def head(self, model, z: Tensor, generator=None) -> Tensor:
        m, _ = at_t_eps(model.sde, z)
        return flat_sum(torch.log(m).expand_as(z))

    def start(self, model, z: Tensor, generator=None) -> Tensor:
        m, _ = at_t_eps(model.sde, z)
        return m * z

    def view(self, model) -> StartedModel:
        """The model seen from a point at t_ε: its SDE's marginals are the transition from t_ε (built once)."""
        view = model.__dict__.get("_started_view")
        if view is None or view.sde.base is not model.sde or view.parameterization is not model.parameterization:
            view = StartedModel(StartedSDE(model.sde, model.sde.t_eps), model.parameterization)
            model.__dict__["_started_view"] = view  # a plain attribute: never a submodule, never in state_dict
        return view

    def space(self, transform, levels, dequantizer, sde) -> ModelSpace:
        if levels is None:
            return ModelSpace(transform)
        return ModelSpace(transform, levels, MatchedTruncatedNormal(sde, transform))

    def protocol(self) -> dict[str, Any]:
        return {"bound": self.name, "below_t_eps": "log p(x~) = log p_t_eps(m x~) + D log m(t_eps), the diffusion's "
                "bound from that point at t_eps, truncated-normal dequantization matched to sigma(t_eps)/m(t_eps) "
                "(MATH.md §15)"}


class StartedSDE(SDE):
    """The forward process started at a point at time s (MATH.md §15): Y_t | Y_s = y ~ N(m_{t|s} y, σ_{t|s}² I)
    with m_{t|s} = m(t)/m(s) and σ_{t|s}² = σ(t)² − m_{t|s}² σ(s)² (the transition of an SDE with Gaussian
    marginals), for t ≥ s; f, g and the prior are the SDE's own. Its t_ε, where the denoising form hands
    over to the divergence form, is 2s: σ_{t|s} → 0 as t → s."""

    def __init__(self, base: SDE, s: float):
        self.base, self.s = base, s
        self.T, self.t_eps = base.T, min(2 * s, 0.5 * (s + base.T))

    def _at_s(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(m(s), σ(s)) shaped like t: one time per time, so each belongs to the same example as t does."""
        s = torch.full_like(t, self.s)
        return self.base.m(s), self.base.sigma(s)

    def f(self, y, t):
        return self.base.f(y, t)

    def g(self, t):
        return self.base.g(t)

    def m(self, t):
        m_s, _ = self._at_s(t)
        return self.base.m(t) / m_s

    def sigma(self, t):
        m_s, sigma_s = self._at_s(t.double())
        t64 = t.double()
        var = self.base.sigma(t64) ** 2 - (self.base.m(t64) / m_s * sigma_s) ** 2
        return var.clamp(min=1e-300).sqrt().to(t.dtype)  # no infinite gradient where σ_{t|s} = 0

    def linear_drift(self, t):
        return self.base.linear_drift(t)

    def prior_std(self):
        return self.base.prior_std()

    def prior_sample(self, shape, *, generator=None, device=None, dtype=None):
        return self.base.prior_sample(shape, generator=generator, device=device, dtype=dtype)

    def prior_log_prob(self, y):
        return self.base.prior_log_prob(y)

    def network_time(self, t):
        return self.base.network_time(t)

    @property
    def likelihood_time_density(self):
        """Tabulated from the transition's r = g²/σ_{t|s}², rebuilt when the base SDE's parameters change."""
        return derived(self.base, "_started_likelihood_time_density", lambda: TabulatedTimeDensity(self))


class StartBound(Bound):
    """The bound of a :class:`StartedModel`: draws of t below the start s count zero; nothing to add."""

    name = "started"
    from_t_eps = True

    def __init__(self, s: float):
        self.s = s

    def start_time(self, sde: SDE) -> float:
        return self.s


class StartedModel:
    """A model seen through a :class:`StartedSDE`: the same parameterization (so the same network, time and
    drift a), the forward process's marginals those from a point at s. What the ELBO estimators need of a
    model (``sde``, ``a``, ``bound``); never trained or saved on its own."""

    def __init__(self, sde: StartedSDE, parameterization):
        self.sde, self.parameterization, self.bound = sde, parameterization, StartBound(sde.s)

    def a(self, y: Tensor, t: Tensor) -> Tensor:
        return self.parameterization.drift(y, t)

    def s(self, y: Tensor, t: Tensor) -> Tensor:
        return self.parameterization.score(y, t)


class DiscreteSpace(ModelSpace):
    """Discrete data taken to model space as they are, z = transform(x), for a decoder over the levels: no
    dequantization, no log-det, no bits offset (the bound is on P(x) itself)."""

    def __attrs_post_init__(self) -> None:
        """Discrete data without a dequantizer are what this space is for."""

    def __call__(self, x: Tensor, *, generator=None) -> tuple[Tensor, Tensor, Tensor]:
        z, _ = self.transform.forward(x)
        zeros = x.new_zeros(x.shape[0])
        return z, zeros, zeros

    @property
    def bits_offset(self) -> float:
        return 0.0

    def protocol(self, spec: dict[str, Any] | None = None) -> dict[str, Any]:
        out = self.transform.protocol()
        out.update(dequantization="none: a decoder over the levels (bound: discrete)", levels=self.levels,
                   log_det="none: P(x) is a probability", bits_offset=0.0)
        return out


class MatchedTruncatedNormal(Dequantizer):
    """u = ½ + w/(2τ), w ~ N(0, 1) truncated to [−τ, τ] per dimension, with τ_d = m(t_ε) J_d / (2 L σ(t_ε)),
    J_d = dz/dx̃ at the bin's centre: the bin's half-width in model space in units of σ(t_ε)/m(t_ε), so m x̃
    spreads about a level as Y_{t_ε} does and the bound is tight on a model that has learned the levels
    (i-DODE; MATH.md §15). τ is read from the SDE at every call and held fixed within it (a trainable
    schedule moves it between steps)."""

    def __init__(self, sde: SDE, transform: DataTransform):
        self.sde, self.transform = sde, transform

    def tau(self, x: Tensor, levels: int) -> Tensor:
        with torch.no_grad():
            m, sigma = at_t_eps(self.sde, x.double())
            centre = (x.double() * (levels - 1) + 0.5) / levels
            return (m * transform_slope(self.transform, centre) / (2 * levels * sigma)).double()

    def sample(self, x: Tensor, levels: int, *, generator=None) -> tuple[Tensor, Tensor]:
        tau = self.tau(x, levels)
        w = truncated_normal_draw(x.shape, tau, generator=generator, device=x.device)
        return (0.5 + w / (2 * tau)).to(x.dtype), truncated_normal_log_q(w, tau).to(x.dtype)

    def log_prob(self, u: Tensor, x: Tensor, levels: int) -> Tensor:
        tau = self.tau(x, levels)
        inside = ((u >= 0) & (u <= 1)).flatten(1).all(dim=1)
        log_q = truncated_normal_log_q((u.double() - 0.5) * 2 * tau, tau)
        return torch.where(inside, log_q, -math.inf).to(u.dtype)

    def protocol(self) -> str:
        return ("truncated normal matched to sigma(t_eps): tau = m(t_eps) dz/dx~ / (2 L sigma(t_eps)) per value, "
                "exact log q")


PAPER = Bound()


def make_bound(name: str, transform: DataTransform | None = None, levels: int | None = None) -> Bound:
    """The bound ``name`` for data with ``levels`` (None: continuous) reaching model space by ``transform``."""
    if name == "paper":
        return PAPER
    if name == "truncated":
        return Truncated()
    if name == "discrete":
        if levels is None or transform is None:
            raise SdeflowError("bound: discrete needs data with levels (a decoder over them); these are continuous")
        grid = torch.arange(levels, dtype=torch.float64)[None] / (levels - 1)
        values = transform.forward(grid)[0][0]
        return Discrete(values)
    raise SdeflowError(f"bound: unknown bound {name!r}; expected one of {', '.join(BOUND_NAMES)}")
