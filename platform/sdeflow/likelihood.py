"""Exact likelihood through the probability-flow ODE (MATH.md §7), with torchdiffeq's solvers.

v(x, t) = f − ½ g a (= f − ½ g² s). Integrating dx/dt = v and dΔ/dt = ∇·v from t₀ to T gives
log p₀(x) = log p_T(x_T) + Δ(T). One Hutchinson probe is kept fixed through each solve.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchdiffeq import odeint
from torchdiffeq._impl.odeint import SOLVERS  # the solver names odeint accepts

from .elbo import bound_of, check_probe, divergence, probe_vector
from .errors import InvalidArgument
from .interfaces import bcast


def check_method(method: str) -> str:
    """One of torchdiffeq's solvers, else an InvalidArgument listing them."""
    if method not in SOLVERS:
        raise InvalidArgument("method", f"unknown ODE solver {method!r}; expected one of {', '.join(sorted(SOLVERS))}")
    return method


def ode_velocity(model, x: Tensor, t: Tensor) -> Tensor:
    """v(x, t) = f(x, t) − ½ g(t) a(x, t): the probability-flow ODE's velocity (MATH.md §7)."""
    return model.sde.f(x, t) - 0.5 * bcast(model.sde.g(t), x) * model.a(x, t)


class _Dynamics(torch.nn.Module):
    """The augmented state (x, Δ) for odeint, counting function evaluations."""

    def __init__(self, model, probe: str, v: Tensor | None):
        super().__init__()
        self.model, self.probe, self.v, self.nfe = model, probe, v, 0

    def forward(self, t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        self.nfe += 1
        x = state[0]
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            tb = t.to(x.dtype).expand(x.shape[0])
            velocity = ode_velocity(self.model, x, tb)
            div = divergence(velocity, x, self.probe, v=self.v)
        return velocity.detach(), div.detach()


def ode_log_likelihood(
    model, x: Tensor, *, probe: str = "rademacher", t0: float = 1e-5, method: str = "dopri5",
    rtol: float = 1e-5, atol: float = 1e-5, generator=None,
) -> tuple[Tensor, int]:
    """(log p₀(x) per example, number of function evaluations), integrating forward from t₀ to T."""
    check_probe(probe)
    v = None if probe == "exact" else probe_vector(x, probe, generator)
    dynamics = _Dynamics(model, probe, v)
    times = torch.tensor([t0, model.sde.T], dtype=x.dtype, device=x.device)
    options = _options(method, times)
    xs, deltas = odeint(dynamics, (x, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)), times,
                        method=method, rtol=rtol, atol=atol, options=options)
    return model.sde.prior_log_prob(xs[-1]) + deltas[-1], dynamics.nfe


class ODEEstimator:
    """Evaluation estimator: log p(z) by the ODE, remembering each batch's NFE."""

    def __init__(self, probe: str, t0: float, method: str, rtol: float, atol: float):
        check_probe(probe)
        check_method(method)
        self.kwargs = {"probe": probe, "t0": t0, "method": method, "rtol": rtol, "atol": atol}
        self.nfe: list[int] = []

    def __call__(self, model, z: Tensor, generator) -> Tensor:
        """log p(z) by the ODE from ``t0``; under a bound from t_ε (MATH.md §15), E_q log p_ε(y_ε) + head, the
        ODE started at t_ε from one draw y_ε ~ N(m z, σ² I)."""
        bound = bound_of(model)
        kwargs = {**self.kwargs, "t0": model.sde.t_eps} if bound.from_t_eps else self.kwargs
        logp, nfe = ode_log_likelihood(model, bound.start(model, z, generator), generator=generator, **kwargs)
        self.nfe.append(nfe)
        return logp + bound.head(model, z, generator)


def ode_estimator(cfg) -> ODEEstimator:
    return ODEEstimator(cfg.probe, cfg.ode_t0, cfg.ode_method, cfg.ode_rtol, cfg.ode_atol)


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
