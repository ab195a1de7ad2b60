"""Exact likelihood through the probability-flow ODE (MATH.md §7), with torchdiffeq's solvers.

v(x, t) = f − ½ g a (= f − ½ g² s). Integrating dx/dt = v and dΔ/dt = ∇·v from t₀ to T gives
log p₀(x) = log p_T(x_T) + Δ(T). One Hutchinson probe is kept fixed through each solve.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchdiffeq import odeint

from ..core.errors import InvalidArgument
from ..core.interfaces import bcast
from ..core.time_grids import log_snr
from .elbo import bound_of, check_probe, divergence, probe_vector


def check_method(method: str) -> str:
    """One of the torchdiffeq solvers sdeflow drives (:data:`FIXED_STEP_METHODS`, :data:`ADAPTIVE_METHODS`),
    else an InvalidArgument listing them."""
    known = (*ADAPTIVE_METHODS, *FIXED_STEP_METHODS)
    if method not in known:
        raise InvalidArgument("method", f"unknown ODE solver {method!r}; expected one of {', '.join(sorted(known))}")
    return method


def ode_velocity(model, x: Tensor, t: Tensor) -> Tensor:
    """v(x, t) = f(x, t) − ½ g(t) a(x, t): the probability-flow ODE's velocity (MATH.md §7)."""
    return model.sde.f(x, t) - 0.5 * bcast(model.sde.g(t), x) * model.a(x, t)


TIME_VARIABLES = ("t", "log_t", "log_snr")


class TimeChange:
    """The variable u the solver integrates in, increasing with t, with t(u) and dt/du (MATH.md §7):

    t        u = t                          dt/du = 1
    log_t    u = log t                      dt/du = t
    log_snr  u = −λ(t), λ = log(m²/σ²)      dt/du = σ²/g² = 1/r(t)   (λ′ = −g²/σ² for linear drift)

    The velocity of x near t = 0 grows like r(t) ~ 1/t, so steps in log t or in log-SNR stay even where
    steps in t must shrink. t(u) for log-SNR is the SDE's ``log_snr_inverse`` when it has one (VP, sub-VP),
    else bisection on [t₀, T] in float64."""

    def __init__(self, sde, name: str, t0: float):
        if name not in TIME_VARIABLES:
            raise InvalidArgument("ode_time", f"unknown time variable {name!r}; expected one of "
                                  f"{', '.join(TIME_VARIABLES)}")
        self.sde, self.name, self.t0 = sde, name, t0

    def u_of(self, t: float) -> float:
        if self.name == "t":
            return t
        if self.name == "log_t":
            return math.log(t)
        return float(-log_snr(self.sde, torch.tensor([t], dtype=torch.float64))[0])

    def t_of(self, u: Tensor) -> Tensor:
        """t(u), held within [t₀, T] (a solver's trial step past the end sees the ends' dynamics)."""
        u64 = u.to(torch.float64).reshape(1)
        if self.name == "t":
            return u64
        if self.name == "log_t":
            return torch.exp(u64).clamp(self.t0, self.sde.T)
        inverse = getattr(self.sde, "log_snr_inverse", None)
        if inverse is not None:
            return inverse(-u64).clamp(self.t0, self.sde.T)
        lo, hi = torch.full_like(u64, self.t0), torch.full_like(u64, self.sde.T)
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            later = -log_snr(self.sde, mid) < u64
            lo, hi = torch.where(later, mid, lo), torch.where(later, hi, mid)
        return 0.5 * (lo + hi)

    def dt_du(self, t: Tensor) -> Tensor:
        if self.name == "t":
            return torch.ones_like(t)
        if self.name == "log_t":
            return t
        return 1 / self.sde.likelihood_weight(t)


class _Dynamics(torch.nn.Module):
    """The augmented state (x, Δ) for odeint in the solver's variable u, counting function evaluations."""

    def __init__(self, model, probe: str, v: Tensor | None, time: TimeChange):
        super().__init__()
        self.model, self.probe, self.v, self.time, self.nfe = model, probe, v, time, 0

    def forward(self, u: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        self.nfe += 1
        x = state[0]
        t = self.time.t_of(u)
        scale = self.time.dt_du(t).to(x.dtype)
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            tb = t.to(x.dtype).expand(x.shape[0])
            velocity = ode_velocity(self.model, x, tb)
            div = divergence(velocity, x, self.probe, v=self.v)
        return (scale * velocity).detach(), (scale * div).detach()


def ode_log_likelihood(
    model, x: Tensor, *, probe: str = "rademacher", t0: float = 1e-5, method: str = "dopri5",
    rtol: float = 1e-5, atol: float = 1e-5, generator=None, time: str = "t",
) -> tuple[Tensor, int]:
    """(log p_{t₀}(x) per example, number of function evaluations), integrating forward from t₀ to T in the
    variable ``time`` (t, log_t or log_snr: :class:`TimeChange`)."""
    check_probe(probe)
    v = None if probe == "exact" else probe_vector(x, probe, generator)
    change = TimeChange(model.sde, time, t0)
    dynamics = _Dynamics(model, probe, v, change)
    times = torch.tensor([change.u_of(t0), change.u_of(model.sde.T)], dtype=torch.float64, device=x.device)
    options = _options(method, times)
    if time != "t" and method in ADAPTIVE_METHODS:  # the solver's own first guess can overshoot the interval
        options["first_step"] = float(times[1] - times[0]) / 100
    xs, deltas = odeint(dynamics, (x, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)), times.to(x.dtype),
                        method=method, rtol=rtol, atol=atol, options=options)
    return model.sde.prior_log_prob(xs[-1]) + deltas[-1], dynamics.nfe


class ODEEstimator:
    """Evaluation estimator: log p(z) by the ODE, remembering each batch's NFE. ``repeats`` solves per example
    (each with its own dequantization draw and probe) are combined by ``combine`` in the evaluation loop
    (:func:`sdeflow.evaluation.evaluate.batch_nll`)."""

    def __init__(self, probe: str, t0: float, method: str, rtol: float, atol: float, time: str = "t",
                 repeats: int = 1, combine: str = "mean"):
        check_probe(probe)
        check_method(method)
        TimeChange(None, time, t0)
        if repeats < 1:
            raise InvalidArgument("ode_repeats", f"must be at least 1, got {repeats}")
        if combine not in ("mean", "logmeanexp"):
            raise InvalidArgument("ode_combine", f"expected 'mean' or 'logmeanexp', got {combine!r}")
        self.kwargs = {"probe": probe, "t0": t0, "method": method, "rtol": rtol, "atol": atol, "time": time}
        self.repeats, self.combine = repeats, combine
        self.nfe: list[int] = []

    def __call__(self, model, z: Tensor, generator) -> Tensor:
        """log p(z) by the ODE from ``t0``; under a bound from t_ε (MATH.md §15), the ODE from t_ε at the
        bound's start (the point m z for ``truncated``, a draw y_ε ~ N(m z, σ² I) for ``discrete``) plus its
        head."""
        bound = bound_of(model)
        kwargs = {**self.kwargs, "t0": model.sde.t_eps} if bound.from_t_eps else self.kwargs
        logp, nfe = ode_log_likelihood(model, bound.start(model, z, generator), generator=generator, **kwargs)
        self.nfe.append(nfe)
        return logp + bound.head(model, z, generator)


def ode_estimator(cfg) -> ODEEstimator:
    return ODEEstimator(cfg.probe, cfg.ode_t0, cfg.ode_method, cfg.ode_rtol, cfg.ode_atol, cfg.ode_time,
                        cfg.ode_repeats, cfg.ode_combine)


@torch.no_grad()
def ode_sample(model, x_T: Tensor, ts: Tensor, *, method: str = "dopri5", rtol: float = 1e-5,
               atol: float = 1e-5) -> tuple[Tensor, int]:
    """(states of the probability-flow ODE at every time in ``ts``, decreasing from T, from x_T; the
    number of function evaluations). Adaptive solvers step as the tolerances demand and interpolate
    the states at the times in between, so the NFE does not grow with ``len(ts)``."""
    nfe = 0

    def velocity(t: Tensor, x: Tensor) -> Tensor:
        nonlocal nfe
        nfe += 1
        return ode_velocity(model, x, t.to(x.dtype).expand(x.shape[0]))

    ts = ts.to(x_T)
    states = odeint(velocity, x_T, ts, method=method, rtol=rtol, atol=atol, options=_options(method, ts))
    return states, nfe


FIXED_STEP_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams", "fixed_adams")
ADAPTIVE_METHODS = ("dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun")


def _options(method: str, times: Tensor) -> dict:
    """Fixed-step solvers: 100 steps over the interval. Adaptive ones: the last time is a step boundary
    (``step_t``), so the step that reaches it is shortened to end there instead of stepping past it and
    interpolating back, which would evaluate the SDE outside [t_ε, T] (for VP, σ² < 0 below t = 0).
    Times before the last are read off the solver's dense output and cost no steps."""
    if method in FIXED_STEP_METHODS:
        return {"step_size": float(abs(times[-1] - times[0])) / 100}
    if method in ADAPTIVE_METHODS:
        return {"step_t": times[-1:]}
    return {}
