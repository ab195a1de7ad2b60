"""Reverse-time samplers for the λ-family of plug-in reverse SDEs (MATH.md §3).

Every sampler has the same call: ``sample(model, x_T, ts, *, generator=None, callback=None)``, with the
time grid ``ts`` (T → t_ε, forward time) from ``Sampler.time_grid``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from sdeflow.plugin import (
    SDE,
    Sampler,
    bcast,
    check_grid,
    check_lambda,
    check_method,
    flat_sum,
    hookimpl,
    log_snr,
    make_grid,
    noise_to_signal,
    ode_sample,
    randn_like,
    require,
    t_of_log_snr,
)

Grid = Literal["uniform", "log_snr", "karras"]  # sdeflow.time_grids.GRIDS


class EulerMaruyama(Sampler):
    """X ← X + Δ μ_λ + √Δ σ_λ ξ; λ = 0 is the reverse SDE, λ = 1 the probability-flow ODE (MATH.md §3).

    The last step adds no noise, so the output is the mean of the final transition. ``nfe``: network
    evaluations of the last call, one per step (and, with a corrector, ``corrector_steps`` more per step).
    """

    def __init__(self, steps: int = 500, lam: float = 0.0):
        require(steps >= 1, "steps", f"must be at least 1, got {steps}")
        check_lambda(lam)
        self.steps, self.lam, self.nfe = steps, lam, 0

    def predictor(self, model, x: Tensor, t: Tensor, dt: Tensor, noise: bool, generator) -> Tensor:
        x = x + dt * model.mu_lambda(x, t, self.lam)
        if noise and self.lam < 1:
            x = x + dt.sqrt() * bcast(model.sigma_lambda(t, self.lam), x) * randn_like(x, generator)
        return x

    def corrector(self, model, x: Tensor, t: Tensor, generator) -> Tensor:
        return x

    def evaluations_per_step(self) -> int:
        return 1

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
        self.nfe = (len(ts) - 1) * self.evaluations_per_step()
        return x


class PredictorCorrector(EulerMaruyama):
    """Euler–Maruyama predictor with Langevin corrector steps at signal-to-noise ratio ``snr``
    (Song et al. 2021, Alg. 4–5, with α = 1)."""

    def __init__(self, steps: int = 500, lam: float = 0.0, snr: float = 0.16, corrector_steps: int = 1):
        super().__init__(steps, lam)
        require(snr > 0, "snr", f"must be positive, got {snr}")
        require(corrector_steps >= 0, "corrector_steps", "must be ≥ 0")
        self.snr, self.corrector_steps = snr, corrector_steps

    def evaluations_per_step(self) -> int:
        return 1 + self.corrector_steps

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

    ``steps`` sets only the grid at which states are reported (trajectories); the solver picks its own
    steps and interpolates the states in between. ``nfe``: the velocity evaluations of the last call.
    """

    lam = 1.0

    def __init__(self, steps: int = 100, method: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5):
        require(steps >= 1, "steps", f"must be at least 1, got {steps}")
        require(rtol > 0 and atol > 0, "rtol", "tolerances must be positive")
        check_method(method)
        self.steps, self.method, self.rtol, self.atol, self.nfe = steps, method, rtol, atol, 0

    @torch.no_grad()
    def sample(self, model, x_T: Tensor, ts: Tensor, *, generator=None, callback=None) -> Tensor:
        states, self.nfe = ode_sample(model, x_T, ts, method=self.method, rtol=self.rtol, atol=self.atol)
        if callback is not None:
            for i, x in enumerate(states):
                callback(i, ts[i], x)
        return states[-1]


class OnGrid(Sampler):
    """A sampler whose default time grid is the one named by ``grid`` (sdeflow.time_grids)."""

    grid: str

    def time_grid(self, sde: SDE, steps: int | None = None) -> Tensor:
        return make_grid(self.grid, sde, self.steps if steps is None else steps)


def _scalar_time(t: float, x: Tensor) -> Tensor:
    """The time t for every example of x: shape (B,), x's dtype and device."""
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)


def heun_step(model, x: Tensor, t: float, t_next: float) -> Tensor:
    """x ← x + Δ (d + d′)/2, d = μ₁(x, t), d′ = μ₁(x + Δ d, t′), Δ = t − t′ > 0 (Karras et al. 2022, Alg. 1)."""
    dt = t - t_next
    d = model.mu_lambda(x, _scalar_time(t, x), 1.0)
    d_next = model.mu_lambda(x + dt * d, _scalar_time(t_next, x), 1.0)
    return x + 0.5 * dt * (d + d_next)


def churn_times(sde: SDE, ts: Tensor, gamma: float) -> Tensor:
    """t̂_i ≥ t_i with σ̃(t̂_i) = (1 + γ) σ̃(t_i), σ̃ = σ/m, capped at T (Karras et al. 2022, Alg. 2, line 5)."""
    target = (1 + gamma) * noise_to_signal(sde, ts)
    return torch.maximum(t_of_log_snr(sde, -2 * torch.log(target)), ts)


def churn(sde: SDE, x: Tensor, t: float, t_hat: float, generator) -> Tensor:
    """x̂ = (m̂/m) x + m̂ √(σ̃̂² − σ̃²) ε: from the marginal at t to that at t̂ (Karras et al. 2022, Alg. 2, line 6)."""
    both = torch.tensor([t, t_hat], dtype=torch.float64)
    m, sig = sde.m(both), noise_to_signal(sde, both)
    scale = float(m[1]) * math.sqrt(max(float(sig[1] ** 2 - sig[0] ** 2), 0.0))
    return float(m[1] / m[0]) * x + scale * randn_like(x, generator)


class Heun(OnGrid):
    """Heun's second-order method on the probability-flow ODE: reverse-time drift μ₁ = ½ g a − f, λ = 1
    (MATH.md §3; Karras et al. 2022, Alg. 1), on the ``grid`` (EDM's ρ = 7 schedule by default).

    ``churn`` > 0 adds EDM's stochastic churn (Alg. 2, S_churn): before each step the state is moved
    to a noisier time t̂ with σ̃(t̂) = (1 + γ) σ̃(t), γ = min(churn/steps, √2 − 1), σ̃ = σ/m, by adding
    fresh noise; churn = 0 is deterministic. ``nfe``: 2 per step (the last step too, since t_ε > 0).
    """

    def __init__(self, steps: int = 50, grid: Grid = "karras", churn: float = 0.0):
        require(steps >= 1, "steps", f"must be at least 1, got {steps}")
        check_grid(grid)
        require(churn >= 0, "churn", f"must be ≥ 0, got {churn}")
        self.steps, self.grid, self.churn, self.nfe = steps, grid, churn, 0
        self.lam = 1.0 if churn == 0 else None  # the ODE when deterministic

    @torch.no_grad()
    def sample(self, model, x_T: Tensor, ts: Tensor, *, generator=None, callback=None) -> Tensor:
        times = ts.detach().to("cpu", torch.float64)
        n = len(times) - 1
        gamma = min(self.churn / max(n, 1), math.sqrt(2) - 1)
        starts = churn_times(model.sde, times[:-1], gamma) if gamma > 0 else times[:-1]
        x = x_T
        if callback is not None:
            callback(0, ts[0], x)
        for i in range(n):
            t, t_next = float(starts[i]), float(times[i + 1])
            if t > float(times[i]):
                x = churn(model.sde, x, float(times[i]), t, generator)
            x = heun_step(model, x, t, t_next)
            if callback is not None:
                callback(i + 1, ts[i + 1], x)
        self.nfe = 2 * n
        return x


def data_prediction(model, x: Tensor, t: float, m: float, sigma: float) -> Tensor:
    """x̂₀ = (x − σ ε̂)/m with ε̂ = −σ s(x, t) (DPM-Solver++, Lu et al. 2022, §4)."""
    eps = -sigma * model.s(x, _scalar_time(t, x))
    return (x - sigma * eps) / m


def phi_integrals(h: float) -> tuple[float, float, float]:
    """∫₀ʰ e^{−(h−u)} uᵏ du for k = 0, 1, 2: the weights of x̂₀'s Taylor terms in the exact solution (Lu et al. 2022)."""
    e = -math.expm1(-h)  # 1 − e^{−h}, exact for small h
    i1 = h - e
    return e, i1, h * h - 2 * i1


def dpm_solver_pp_step(x: Tensor, ratio: float, alpha: float, h: float, lams: list[float],
                       preds: list[Tensor]) -> Tensor:
    """x_t = (σ_t/σ_s) x_s + α_t ∫₀ʰ e^{−(h−u)} p(λ_s + u) du, p the polynomial through the last k data
    predictions (λ_j, x̂₀_j), newest last (DPM-Solver++ multistep, Lu et al. 2022, §4.2; k = 1 is DDIM)."""
    i0, i1, i2 = phi_integrals(h)
    y0 = preds[-1]
    out = ratio * x + alpha * i0 * y0
    if len(preds) >= 2:
        d1 = (y0 - preds[-2]) / (lams[-1] - lams[-2])  # divided difference [y₀, y₁]
        slope = d1
        if len(preds) >= 3:
            d1_prev = (preds[-2] - preds[-3]) / (lams[-2] - lams[-3])
            d2 = (d1 - d1_prev) / (lams[-1] - lams[-3])  # [y₀, y₁, y₂]
            slope = d1 + d2 * (lams[-1] - lams[-2])  # p(λ_s + u) = y₀ + (d1 + d2 h₀) u + d2 u²
            out = out + alpha * i2 * d2
        out = out + alpha * i1 * slope
    return out


class DPMSolver(OnGrid):
    """DPM-Solver++ multistep (Lu et al. 2022) of order 1–3 on the probability-flow ODE, with data
    prediction x̂₀ from the score and λ = log(m/σ), so it serves any SDE with Y_t | x ~ N(m x, σ² I).

    Each step integrates the ODE's linear part exactly and x̂₀ by its interpolating polynomial in λ
    through the last ``order`` evaluations; the first steps use as many as there are (order 1, 2, …),
    and with fewer than ``LOWER_ORDER_FINAL_BELOW`` steps the last ones lower the order again, as
    DPM-Solver++ does (on the shipped Swiss-roll model, order 3 at 5 steps: SWD 1.74 without, 0.84
    with; order 2 at 5 steps: 0.27 without, 0.36 with; from 10 steps on both are near the ODE's
    converged 0.100). Order 1 is DDIM. ``nfe``: one network evaluation per step.
    """

    LOWER_ORDER_FINAL_BELOW = 10

    lam = 1.0

    def __init__(self, steps: int = 20, order: Literal[1, 2, 3] = 2, grid: Grid = "log_snr"):
        require(steps >= 1, "steps", f"must be at least 1, got {steps}")
        require(order in (1, 2, 3), "order", f"must be 1, 2 or 3, got {order}")
        check_grid(grid)
        self.steps, self.order, self.grid, self.nfe = steps, order, grid, 0

    @torch.no_grad()
    def sample(self, model, x_T: Tensor, ts: Tensor, *, generator=None, callback=None) -> Tensor:
        times = ts.detach().to("cpu", torch.float64)
        m, sigma = model.sde.m(times).tolist(), model.sde.sigma(times).tolist()
        lam = (0.5 * log_snr(model.sde, times)).tolist()  # log(m/σ), DPM-Solver's λ
        x, lams, preds = x_T, [], []
        if callback is not None:
            callback(0, ts[0], x)
        for i in range(len(times) - 1):
            lams = [*lams, lam[i]][-self.order:]
            preds = [*preds, data_prediction(model, x, float(times[i]), m[i], sigma[i])][-self.order:]
            k = len(lams)
            if len(times) - 1 < self.LOWER_ORDER_FINAL_BELOW:
                k = min(k, len(times) - 1 - i)  # order 1 on the last step, 2 on the one before, …
            x = dpm_solver_pp_step(x, sigma[i + 1] / sigma[i], m[i + 1], lam[i + 1] - lam[i], lams[-k:], preds[-k:])
            if callback is not None:
                callback(i + 1, ts[i + 1], x)
        self.nfe = len(times) - 1
        return x


@hookimpl
def sdeflow_register_samplers(register):
    register("euler_maruyama", EulerMaruyama)
    register("pc", PredictorCorrector)
    register("ode", ODE)
    register("heun", Heun)
    register("dpm_solver", DPMSolver)
