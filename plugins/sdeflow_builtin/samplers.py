"""Reverse-time samplers for the λ-family of plug-in reverse SDEs (MATH.md §3).

Every sampler has the same call: ``sample(model, x_T, ts, *, generator=None, callback=None)``, with the
time grid ``ts`` (T → t_ε, forward time) from ``Sampler.time_grid``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sdeflow.errors import require
from sdeflow.hookspecs import hookimpl
from sdeflow.interfaces import Sampler, bcast, flat_sum, randn_like
from sdeflow.likelihood import check_method, ode_sample
from sdeflow.model import check_lambda


class EulerMaruyama(Sampler):
    """X ← X + Δ μ_λ + √Δ σ_λ ξ; λ = 0 is the reverse SDE, λ = 1 the probability-flow ODE (MATH.md §3).

    The last step adds no noise, so the output is the mean of the final transition.
    """

    def __init__(self, steps: int = 500, lam: float = 0.0):
        require(steps >= 1, "steps", f"must be at least 1, got {steps}")
        check_lambda(lam)
        self.steps, self.lam = steps, lam

    def predictor(self, model, x: Tensor, t: Tensor, dt: Tensor, noise: bool, generator) -> Tensor:
        x = x + dt * model.mu_lambda(x, t, self.lam)
        if noise and self.lam < 1:
            x = x + dt.sqrt() * bcast(model.sigma_lambda(t, self.lam), x) * randn_like(x, generator)
        return x

    def corrector(self, model, x: Tensor, t: Tensor, generator) -> Tensor:
        return x

    @torch.no_grad()
    def sample(self, model, x_T: Tensor, ts: Tensor, *, generator=None, callback=None) -> Tensor:
        ts = ts.to(device=x_T.device, dtype=x_T.dtype)
        x = x_T
        if callback is not None:
            callback(0, ts[0], x)
        last = len(ts) - 2
        for i in range(len(ts) - 1):
            t = ts[i].expand(x.shape[0])
            x = self.corrector(model, x, t, generator)
            x = self.predictor(model, x, t, ts[i] - ts[i + 1], i < last, generator)
            if callback is not None:
                callback(i + 1, ts[i + 1], x)
        return x


class PredictorCorrector(EulerMaruyama):
    """Euler–Maruyama predictor with Langevin corrector steps at signal-to-noise ratio ``snr``
    (Song et al. 2021, Alg. 4–5, with α = 1)."""

    def __init__(self, steps: int = 500, lam: float = 0.0, snr: float = 0.16, corrector_steps: int = 1):
        super().__init__(steps, lam)
        require(snr > 0, "snr", f"must be positive, got {snr}")
        require(corrector_steps >= 0, "corrector_steps", "must be ≥ 0")
        self.snr, self.corrector_steps = snr, corrector_steps

    def corrector(self, model, x: Tensor, t: Tensor, generator) -> Tensor:
        for _ in range(self.corrector_steps):
            score = model.s(x, t)
            z = randn_like(x, generator)
            # One step size for the batch, from batch-averaged norms: a per-example ratio would blow up
            # near modes (‖s‖ → 0) and no longer leave the target distribution invariant.
            ratio = flat_sum(z**2).sqrt().mean() / flat_sum(score**2).sqrt().mean().clamp(min=1e-12)
            step = 2 * (self.snr * ratio) ** 2
            x = x + step * score + (2 * step).sqrt() * z
        return x


class ODE(Sampler):
    """The probability-flow ODE (λ = 1) with an adaptive solver from torchdiffeq (MATH.md §7).

    ``steps`` sets only the grid at which states are reported (trajectories); the solver picks its own.
    """

    lam = 1.0

    def __init__(self, steps: int = 100, method: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5):
        require(steps >= 1, "steps", f"must be at least 1, got {steps}")
        require(rtol > 0 and atol > 0, "rtol", "tolerances must be positive")
        check_method(method)
        self.steps, self.method, self.rtol, self.atol = steps, method, rtol, atol

    @torch.no_grad()
    def sample(self, model, x_T: Tensor, ts: Tensor, *, generator=None, callback=None) -> Tensor:
        states = ode_sample(model, x_T, ts, method=self.method, rtol=self.rtol, atol=self.atol)
        if callback is not None:
            for i, x in enumerate(states):
                callback(i, ts[i], x)
        return states[-1]


@hookimpl
def sdeflow_register_samplers(register):
    register("euler_maruyama", EulerMaruyama)
    register("pc", PredictorCorrector)
    register("ode", ODE)
