"""The abstract interfaces plugins implement. Notation and equations: MATH.md (Huang et al. 2021).

Time ``t`` runs forward (data → noise) on [0, T]; tensors of times have shape (B,) and broadcast
against a batch ``y`` of shape (B, ...). Every method works for a batch of one.
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator
from typing import Any, Literal, Protocol

import attrs
import torch
from torch import Tensor, nn


def bcast(t: Tensor, y: Tensor) -> Tensor:
    """Reshape per-example times (B,) to broadcast against y (B, ...)."""
    return t.reshape(-1, *([1] * (y.ndim - 1)))


def flat_sum(x: Tensor) -> Tensor:
    """Sum over every dimension but the batch: (B, ...) → (B,)."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


def randn_like(x: Tensor, generator=None) -> Tensor:
    """Standard normal noise shaped like x, from ``generator`` when one is given."""
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def gaussian_log_prob(y: Tensor, std: float | Tensor = 1.0) -> Tensor:
    """log N(y; 0, std² I) per example."""
    D = y[0].numel()
    std = torch.as_tensor(std, dtype=y.dtype, device=y.device)
    return -0.5 * flat_sum(y**2) / std**2 - D * torch.log(std) - 0.5 * D * math.log(2 * math.pi)


SHARED = "shared"
_DRAW_EXAMPLES: contextvars.ContextVar[Tensor | str | None] = contextvars.ContextVar("sdeflow_draw_examples",
                                                                                    default=None)


@contextlib.contextmanager
def draws_of(examples: Tensor | str | None) -> Iterator[None]:
    """Within the block, a tensor of times an SDE is evaluated at belongs to the examples ``examples``: a
    LongTensor (entry i is the example of time i), :data:`SHARED` (one value every example's loss uses alike,
    such as a constant of the bound), or None (one time per example, in order: the default). The ELBO says
    so wherever its times are not one per example, for a component that scales gradients per example (the
    learned VP's variance gradient)."""
    token = _DRAW_EXAMPLES.set(examples)
    try:
        yield
    finally:
        _DRAW_EXAMPLES.reset(token)


def draw_examples() -> Tensor | str | None:
    """What :func:`draws_of` declared for the times being evaluated now."""
    return _DRAW_EXAMPLES.get()


class SDE(abc.ABC):
    """Inference SDE dY = f(Y, t) dt + g(t) dB_t with Y_t | x ~ N(m(t) x, σ(t)² I) (MATH.md §1)."""

    T: float = 1.0
    t_eps: float = 1e-3

    @abc.abstractmethod
    def f(self, y: Tensor, t: Tensor) -> Tensor:
        """Drift f(y, t), shaped like y."""

    @abc.abstractmethod
    def g(self, t: Tensor) -> Tensor:
        """Diffusion coefficient g(t), shape (B,)."""

    @abc.abstractmethod
    def m(self, t: Tensor) -> Tensor:
        """Mean coefficient m(t) of Y_t | x, shape (B,)."""

    @abc.abstractmethod
    def sigma(self, t: Tensor) -> Tensor:
        """Standard deviation σ(t) of Y_t | x, shape (B,)."""

    @abc.abstractmethod
    def prior_sample(self, shape: tuple[int, ...], *, generator=None, device=None, dtype=None) -> Tensor:
        """Draw from the prior p_T."""

    @abc.abstractmethod
    def prior_log_prob(self, y: Tensor) -> Tensor:
        """log p_T(y) per example."""

    def linear_drift(self, t: Tensor) -> Tensor | None:
        """κ(t), shape (B,), when the drift is linear, f(y, t) = κ(t) y; None when it is not. The denoising form
        of the ELBO needs it (MATH.md §9). Marginals N(m x, σ² I) for every x imply an affine drift with
        κ = d log m/dt, so the default derives κ from m by central differences in float64 (one-sided at 0 and
        T); the kernel checks it against f before using it (``sdeflow.likelihood.elbo.require_linear_drift``). Override
        it with the closed form, or return None for an SDE whose drift is not linear."""
        t64 = t.detach().to(torch.float64)
        h = 1e-5 * self.T
        lo, hi = (t64 - h).clamp(min=0.0), (t64 + h).clamp(max=self.T)
        with torch.no_grad():
            slope = (torch.log(self.m(hi).double()) - torch.log(self.m(lo).double())) / (hi - lo)
        return slope.to(t.dtype)

    def prior_std(self) -> float | None:
        """s when the prior p_T is N(0, s² I), else None (the default). With it E log p_T(Y_T) has a closed
        form (MATH.md §9)."""
        return None

    def network_time(self, t: Tensor) -> Tensor:
        """τ ∈ [0, 1], what a network is conditioned on: t / T (the default). An SDE with a learned
        schedule may return its normalised log-SNR instead, so the network is a function of the noise
        level rather than of the clock (VDM)."""
        return t / self.T

    def likelihood_weight(self, t: Tensor) -> Tensor:
        """r(t) = g(t)² / σ(t)²: the weight that turns σ²-weighted DSM into the ELBO (MATH.md §4)."""
        return self.g(t) ** 2 / self.sigma(t) ** 2

    def truncated_likelihood_weight(self, t: Tensor) -> Tensor:
        """w(t) = r(max(t, t_ε)), integrable on [0, T] (MATH.md §4)."""
        return self.likelihood_weight(t.clamp(min=self.t_eps))

    @property
    def likelihood_time_density(self) -> TimeDensity:
        """The density q(t) ∝ w(t) on [0, T] (MATH.md §6), built by :meth:`make_likelihood_time_density`
        once, and again whenever the SDE's parameters have changed (a trainable SDE's is never stale)."""
        return derived(self, "_likelihood_time_density", self.make_likelihood_time_density)

    def make_likelihood_time_density(self) -> TimeDensity:
        """Tabulated unless a subclass has a closed form."""
        return TabulatedTimeDensity(self)

    def marginal_sample(self, x: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """y = m(t) x + σ(t) ε."""
        return bcast(self.m(t), x) * x + bcast(self.sigma(t), x) * eps


def derived(component: Any, name: str, build: Callable[[], Any]) -> Any:
    """``build()``, kept on ``component`` as ``name`` and built again whenever the component's parameters
    have changed (a table derived from a trainable component is never stale). Built without a graph:
    importance weights are constants, the gradient flows through w and ℓ only."""
    key = tuple(p.detach().clone() for p in component.parameters()) if isinstance(component, nn.Module) else ()
    cached = component.__dict__.get(name)
    if cached is None or len(cached[0]) != len(key) or not all(map(torch.equal, cached[0], key)):
        with torch.no_grad():
            cached = (key, build())
        component.__dict__[name] = cached
    return cached[1]


class TimeDensity(abc.ABC):
    """A density on [0, T] with its CDF and inverse CDF, for importance sampling of t."""

    Z: float
    """Normaliser: ∫₀ᵀ w(t) dt for the unnormalised weight w this density is proportional to."""

    @abc.abstractmethod
    def pdf(self, t: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def cdf(self, t: Tensor) -> Tensor: ...

    @abc.abstractmethod
    def icdf(self, u: Tensor) -> Tensor: ...


class TabulatedTimeDensity(TimeDensity):
    """q(t) ∝ w(t) = r(max(t, t_ε)) for any SDE, by a fine table of ∫ r and linear interpolation.

    The density reported is the exact density of the samples drawn (piecewise constant between
    grid points), so importance weights stay unbiased whatever the table's resolution.
    """

    @torch.no_grad()  # a table of a trainable SDE is a constant of the step (it is rebuilt when they change)
    def __init__(self, sde: SDE, points: int = 20001):
        knots = torch.logspace(math.log10(sde.t_eps), math.log10(sde.T), points, dtype=torch.float64)
        r = sde.likelihood_weight(knots).to(torch.float64)
        r_eps = float(r[0])
        area = torch.cumsum(0.5 * (r[1:] + r[:-1]) * knots.diff(), 0)
        mass = torch.cat([torch.zeros(1, dtype=torch.float64), area]) + sde.t_eps * r_eps
        zero = torch.zeros(1, dtype=torch.float64)
        self._tabulate(torch.cat([zero, knots]), torch.cat([zero, mass]), sde.T)

    @classmethod
    def from_mass(cls, knots: Tensor, mass: Tensor, T: float) -> TabulatedTimeDensity:
        """The density whose CDF is ``mass / mass[-1]``, linear between ``knots`` (from 0 to T, float64)."""
        density = cls.__new__(cls)
        density._tabulate(knots, mass, T)
        return density

    def _tabulate(self, knots: Tensor, mass: Tensor, T: float) -> None:
        self.knots, self.Z, self.T = knots, float(mass[-1]), T
        self.cum = mass / self.Z
        self._on_device: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _table(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """The table on ``like``'s device, copied there once (not on every training step)."""
        if like.device not in self._on_device:
            self._on_device[like.device] = (self.knots.to(like.device), self.cum.to(like.device))
        return self._on_device[like.device]

    def pdf(self, t: Tensor) -> Tensor:
        knots, cum = self._table(t)
        i = torch.searchsorted(knots, t.to(torch.float64).clamp(0, self.T), right=True).clamp(1, len(knots) - 1)
        slope = (cum[i] - cum[i - 1]) / (knots[i] - knots[i - 1])
        return slope.to(t.dtype)

    def cdf(self, t: Tensor) -> Tensor:
        knots, cum = self._table(t)
        return _interp(t.to(torch.float64).clamp(0, self.T), knots, cum).to(t.dtype)

    def icdf(self, u: Tensor) -> Tensor:
        knots, cum = self._table(u)
        return _interp(u.to(torch.float64).clamp(0, 1), cum, knots).to(u.dtype)


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation of increasing knots xp → fp (torch has no ``interp``)."""
    i = torch.searchsorted(xp, x, right=True).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    return f0 + (f1 - f0) * (x - x0) / (x1 - x0)


class Parameterization(nn.Module, abc.ABC):
    """Wraps a network and reads its output as the drift a, the score s or the noise ε (MATH.md §2).

    Uses only the SDE's abstract interface. The network sees the SDE's clock τ ∈ [0, 1]
    (``SDE.network_time``: t / T unless the SDE has a better one) and scales it for its own embedding.

    ``bounded_at_zero``: whether the ELBO integrand ½‖a‖² + ∇·μ stays bounded as t → 0 for a network that is
    not exact there (MATH.md §13). A parameterization that divides by σ(t) declares False, and the paper's
    bound (integrated to t = 0) is then refused at check; a bound from t_ε is finite for any (§15).
    """

    bounded_at_zero: bool = True

    def __init__(self, network: nn.Module, sde: SDE):
        super().__init__()
        self.network = network
        self.sde = sde

    def net(self, y: Tensor, t: Tensor) -> Tensor:
        return self.network(y, self.sde.network_time(t))

    @abc.abstractmethod
    def drift(self, y: Tensor, t: Tensor) -> Tensor:
        """a(y, t), with a = g s."""

    @abc.abstractmethod
    def score(self, y: Tensor, t: Tensor) -> Tensor:
        """s(y, t) ≈ ∇ log q_t(y)."""


class TimeSampler(abc.ABC):
    """Draws t ∈ [0, T] and reports its density q(t), so losses can weight by w(t) / q(t)."""

    @abc.abstractmethod
    def density(self, sde: SDE, t: Tensor) -> Tensor:
        """q(t), shape (B,)."""

    @abc.abstractmethod
    def sample(self, sde: SDE, n: int, *, device=None, generator=None) -> tuple[Tensor, Tensor]:
        """(t, q(t)), each of shape (n,)."""

    def sample_u(self, sde: SDE, u: Tensor) -> tuple[Tensor, Tensor]:
        """(t, q(t)) with t = Φ⁻¹(u), the inverse CDF at u ∈ (0, 1] of shape (n,). Optional: it lets
        evaluation stratify u (sdeflow.likelihood.time_proposals); the default raises NotImplementedError."""
        raise NotImplementedError(f"time sampler {type(self).__name__} has no inverse CDF (TimeSampler.sample_u)")


class Loss(abc.ABC):
    """A per-example training loss of the composed model (MATH.md §4–5).

    ``trains``: the component kinds whose parameters its gradient trains. A loss that is not a bound on
    the likelihood trains only the network and the parameterization (the default); a bound (the
    ELBO) may also train the SDE, the time sampler and itself. The kernel refuses an experiment whose
    trainable component the loss does not train.

    Optional: ``weight(sde, t)``, the time weight w(t) a loss divides by the sampler's q(t) (the kernel
    then warns when a non-uniform time sampler leaves w/q far from constant), and
    ``matched_time_sampler_fix``, a one-line hint for that warning; ``check_sde(sde)``, raising
    :class:`~sdeflow.core.errors.InvalidArgument` (naming the loss's own argument) for an SDE it cannot
    train with, which ``sdeflow check`` reports as a config error naming both sections.
    """

    trains: frozenset[str] = frozenset({"parameterization"})

    @abc.abstractmethod
    def __call__(self, model, x: Tensor, time_sampler: TimeSampler, *, generator=None) -> Tensor:
        """Per-example loss, shape (B,)."""


class Sampler(abc.ABC):
    """A reverse-time sampler: integrates the generative process from x_T at ts[0] = T down to ts[-1].

    ``callback(i, t, x)`` is called with every state, the initial one included (i = 0 … len(ts) − 1).
    """

    steps: int
    nfe: int = 0
    """Network evaluations of the last ``sample`` call (the cost a sampler is compared by)."""

    def time_grid(self, sde: SDE, steps: int | None = None) -> Tensor:
        """The default grid: ``steps`` equal intervals from T down to t_ε."""
        return time_grid(sde, self.steps if steps is None else steps)

    @abc.abstractmethod
    def sample(
        self, model, x_T: Tensor, ts: Tensor, *, generator=None, callback: Callable | None = None
    ) -> Tensor:
        """The final state at ts[-1]."""

    def trajectory(self, model, x_T: Tensor, ts: Tensor, *, generator=None) -> tuple[Tensor, Tensor]:
        """(final state, every state stacked: shape (len(ts), *x_T.shape), kept on the CPU)."""
        states: list[Tensor] = []
        x = self.sample(model, x_T, ts, generator=generator, callback=lambda i, t, s: states.append(s.cpu()))
        return x, torch.stack(states)


def time_grid(sde: SDE, steps: int) -> Tensor:
    """``steps`` + 1 equally spaced times from T down to t_ε."""
    return torch.linspace(sde.T, sde.t_eps, steps + 1, dtype=torch.float64)


class Dequantizer(abc.ABC):
    """q(u | x): where inside its bin a value of discrete data lies, u ∈ [0, 1]^D (MATH.md §14).

    Data x ∈ {0, …, L−1}/(L−1) (``DataBundle.levels`` = L) are dequantized by the kernel as
    x̃ = (x (L−1) + u)/L, and every bpd counts ``log q(u | x)``: any density on the unit bin gives an
    upper bound on −log₂ P(x) (MATH.md §14). A dequantizer with parameters (an ``nn.Module``) is
    trained with the model by a loss that bounds the likelihood.
    """

    @abc.abstractmethod
    def sample(self, x: Tensor, levels: int, *, generator=None) -> tuple[Tensor, Tensor]:
        """(u shaped like x, and log q(u | x) summed over dimensions, shape (B,))."""

    @abc.abstractmethod
    def log_prob(self, u: Tensor, x: Tensor, levels: int) -> Tensor:
        """log q(u | x) per example, shape (B,), for u ∈ (0, 1)^D of your choosing."""

    def protocol(self) -> str:
        """One line saying what q is (recorded in eval.json beside every bpd)."""
        return type(self).__name__


class DataTransform(abc.ABC):
    """Maps data x to the space the model sees, z, with log|det ∂z/∂x| per example (MATH.md §5)."""

    bits_offset: float = 0.0
    """Added to bits per dimension: log₂(levels) for quantised data (8 for 8-bit images), else 0."""

    @abc.abstractmethod
    def forward(self, x: Tensor, *, generator=None) -> tuple[Tensor, Tensor]:
        """(z, log|det ∂z/∂x̃|), the latter of shape (B,)."""

    @abc.abstractmethod
    def inverse(self, z: Tensor) -> Tensor:
        """Back to data space (for showing samples)."""

    def protocol(self) -> dict[str, Any]:
        """What a reported bpd assumes about this transform (recorded in eval.json beside every result)."""
        return {"transform": type(self).__name__, "bits_offset": self.bits_offset}


@attrs.define
class DataBundle:
    """What a data-set plugin returns.

    ``train``, ``val`` and ``test`` are tensors of examples (fast path for in-memory data) or torch
    Datasets whose items are tensors or (tensor, label) pairs. ``val`` is a held-out split for model
    selection and periodic evaluation, never trained on; it is optional (None: the data set offers
    none), so it comes last and ``DataBundle(train, test, shape=..., ...)`` still works. ``log_prob``,
    when known, is the exact data log-density in data space, reported next to the ELBO. ``reference``
    is every training image as stored (no augmentation, val not held out), for FID and KID's
    reference statistics; None: ``train`` is used. ``levels`` is the number of values L of discrete
    data stored as x ∈ {0, …, L−1}/(L−1) (256 for 8-bit images): the experiment's dequantizer maps
    them into their bins before ``transform``; None: continuous data, never dequantized. ``protocol``
    describes the data set for eval.json's protocol (its name and version, whether it is a partial
    copy, the split sizes, the train split's augmentations); None: nothing to add.
    """

    train: Any
    test: Any
    shape: tuple[int, ...]
    transform: DataTransform
    kind: Literal["image", "vector"] = "vector"
    log_prob: Callable[[Tensor], Tensor] | None = None
    train_shuffle: bool = True
    val: Any = None
    reference: Any = None
    levels: int | None = None
    protocol: dict[str, Any] | None = None

    @property
    def planar(self) -> bool:
        """2-D points, which can be drawn as a scatter plot with sampler paths."""
        return self.kind == "vector" and tuple(self.shape) == (2,)


class LRSchedule(Protocol):
    """A learning-rate schedule (kind ``lr_schedule``): ``schedule(k)`` is the factor multiplying every
    parameter group's base rate (``train.lr``, ``train.component_lr``) for update k = 0, 1, … of the run.

    A function of k alone resumes exactly with no state of its own; a schedule that keeps state (one that
    reacts to the loss) also defines ``state_dict()`` and ``load_state_dict(state)``, saved in checkpoints.
    """

    def __call__(self, step: int) -> float: ...
