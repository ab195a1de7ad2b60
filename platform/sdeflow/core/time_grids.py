"""Time grids T = t_0 > t_1 > … > t_N = t_ε for the samplers: equal steps in t, in log-SNR, or EDM's ρ-schedule.

Only the SDE's m(t) and σ(t) are used (MATH.md §1), so every grid serves any SDE whose log-SNR
λ(t) = log(m(t)² / σ(t)²) decreases in t; the non-uniform grids are mapped back to t by bisection.
Each grid is a float64 tensor of N + 1 times, decreasing, with both ends exactly T and t_ε.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import require
from .interfaces import SDE, time_grid

GRIDS = ("uniform", "log_snr", "karras")


def log_snr(sde: SDE, t: Tensor) -> Tensor:
    """λ(t) = log(m(t)² / σ(t)²): the log signal-to-noise ratio of Y_t | x ~ N(m x, σ² I) (MATH.md §1)."""
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    return 2 * (torch.log(sde.m(t)) - torch.log(sde.sigma(t)))


def noise_to_signal(sde: SDE, t: Tensor) -> Tensor:
    """σ̃(t) = σ(t) / m(t) = e^{−λ/2}: EDM's σ, with scale s = m (Karras et al. 2022, Table 1)."""
    return torch.exp(-0.5 * log_snr(sde, t))


def t_of_log_snr(sde: SDE, lam: Tensor, iters: int = 100) -> Tensor:
    """The t ∈ [t_ε, T] with λ(t) = lam, by bisection (λ decreases in t); targets outside clip to an end."""
    lam = torch.as_tensor(lam, dtype=torch.float64).reshape(-1)
    lo, hi = torch.full_like(lam, sde.t_eps), torch.full_like(lam, sde.T)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        later = log_snr(sde, mid) > lam  # still too little noise at mid: the root lies after it
        lo, hi = torch.where(later, mid, lo), torch.where(later, hi, mid)
    return 0.5 * (lo + hi)


def _pin_ends(sde: SDE, t: Tensor) -> Tensor:
    """Set t_0 = T and t_N = t_ε exactly (bisection leaves them within rounding)."""
    t[0], t[-1] = sde.T, sde.t_eps
    return t


def _check_steps(steps: int) -> None:
    require(steps >= 1, "steps", f"must be at least 1, got {steps}")


def uniform_t(sde: SDE, steps: int) -> Tensor:
    """t_i = T − (i/N)(T − t_ε): equal steps in t (the default grid, interfaces.time_grid)."""
    _check_steps(steps)
    return time_grid(sde, steps)


def uniform_log_snr(sde: SDE, steps: int) -> Tensor:
    """λ(t_i) = λ(T) + (i/N)(λ(t_ε) − λ(T)): equal steps h in λ (DPM-Solver, Lu et al. 2022, §3.3)."""
    _check_steps(steps)
    ends = log_snr(sde, torch.tensor([sde.T, sde.t_eps], dtype=torch.float64))
    lam = torch.linspace(float(ends[0]), float(ends[1]), steps + 1, dtype=torch.float64)
    return _pin_ends(sde, t_of_log_snr(sde, lam))


def karras(sde: SDE, steps: int, rho: float = 7.0) -> Tensor:
    """σ̃_i = (σ̃_max^{1/ρ} + (i/N)(σ̃_min^{1/ρ} − σ̃_max^{1/ρ}))^ρ with σ̃ = σ/m (Karras et al. 2022, eq. 5)."""
    _check_steps(steps)
    require(rho > 0, "rho", f"must be positive, got {rho}")
    ends = noise_to_signal(sde, torch.tensor([sde.T, sde.t_eps], dtype=torch.float64)) ** (1 / rho)
    ramp = torch.linspace(float(ends[0]), float(ends[1]), steps + 1, dtype=torch.float64)
    return _pin_ends(sde, t_of_log_snr(sde, -2 * rho * torch.log(ramp)))


def make_grid(name: str, sde: SDE, steps: int) -> Tensor:
    """The grid called ``name`` (one of GRIDS) with ``steps`` intervals."""
    check_grid(name)
    return {"uniform": uniform_t, "log_snr": uniform_log_snr, "karras": karras}[name](sde, steps)


def check_grid(name: str) -> str:
    """One of GRIDS, else an InvalidArgument for ``grid`` listing them."""
    require(name in GRIDS, "grid", f"unknown time grid {name!r}; expected one of {', '.join(GRIDS)}")
    return name
