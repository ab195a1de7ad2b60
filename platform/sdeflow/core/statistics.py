"""Error bars: a mean and its standard error, and whether that standard error can be trusted: the
Pareto shape k̂ of the upper tail of the values it
averages (MATH.md §16).

A per-example bpd estimate (an ELBO of K draws) has a heavy right tail when its draws do: a few draws of
t near 0 can carry a large share of the total. Then std/√n understates the error and the mean usually
lands low. Fitting a generalized Pareto distribution to the largest values (as Pareto-smoothed importance
sampling does, Vehtari et al. 2024) estimates the tail's shape k: the variance of the values is finite only
for k < ½, and the mean converges at the usual rate only then. k̂ ≥ WARN_K marks the s.e. as untrusted.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

WARN_K = 0.5
"""k̂ at or above which the s.e. is not trusted: the values' variance is infinite for k ≥ ½."""
MIN_EXAMPLES = 50
"""Below this many values the tail has too few points for a fit: k̂ is not reported."""
PRIOR_WEIGHT = 10
"""Pseudo-observations pulling k̂ towards ½ (Vehtari et al.'s weak prior, which steadies small tails)."""


def mean_and_se(values: Tensor) -> tuple[float, float | None]:
    """Mean and its standard error std / √N; None for N = 1, where the sample std is undefined."""
    values = values.double()
    n = values.numel()
    se = float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else None
    return float(values.mean()), se


def tail_length(n: int) -> int:
    """How many of the largest values the fit uses: min(n/5, 3√n), as PSIS does for n draws."""
    return int(min(n / 5, 3 * math.sqrt(n)))


def pareto_k(values: Tensor) -> float | None:
    """k̂ of the upper tail of ``values`` (None when there are fewer than MIN_EXAMPLES or the tail is flat).

    The M largest values less the next one are fitted with a generalized Pareto distribution by Zhang &
    Stephens' (2009) posterior-mean estimator: with θ = k/σ, the profile likelihood is
    ℓ(θ) = M [log(θ / k(θ)) − k(θ) − 1], k(θ) = mean log(1 + θ x); θ is averaged over a grid weighted by
    exp ℓ, and k̂ = k(θ̂), pulled towards ½ by PRIOR_WEIGHT pseudo-observations."""
    x = values.detach().double().flatten().sort().values
    n = x.numel()
    if n < MIN_EXAMPLES or not bool(torch.isfinite(x).all()):
        return None
    M = tail_length(n)
    exceed = x[n - M:] - x[n - M - 1]
    if float(exceed[-1]) <= 0:
        return None
    grid_size = 30 + int(math.sqrt(M))
    j = torch.arange(1, grid_size + 1, dtype=torch.float64)
    quartile = exceed[max(int(M / 4 + 0.5) - 1, 0)].clamp(min=float(exceed[-1]) * 1e-12)
    theta = -1 / exceed[-1] + (torch.sqrt(grid_size / (j - 0.5)) - 1) / (3 * quartile)
    theta = theta[theta != 0]
    k = torch.log1p(theta[:, None] * exceed).mean(dim=1)
    profile = M * (torch.log(theta / k) - k - 1)
    weights = torch.softmax(profile, dim=0)
    theta_hat = float((weights * theta).sum())
    k_hat = float(torch.log1p(theta_hat * exceed).mean())
    return (M * k_hat + PRIOR_WEIGHT * 0.5) / (M + PRIOR_WEIGHT)


def tail_diagnostic(values: Tensor) -> dict[str, Any]:
    """What eval.json records beside a mean: k̂ of the upper tail, the tail's length, the share of the total
    excess over the median carried by the largest 1 % of values, and whether the s.e. can be trusted
    (None: too few values to tell)."""
    x = values.detach().double().flatten()
    n = x.numel()
    k_hat = pareto_k(x)
    excess = (x - x.median()).clamp(min=0)
    top = max(1, n // 100)
    total = float(excess.sum())
    share = float(excess.sort(descending=True).values[:top].sum()) / total if total > 0 else 0.0
    return {"pareto_k": k_hat, "tail_length": tail_length(n) if k_hat is not None else 0,
            "top1pct_share": share, "se_trusted": None if k_hat is None else k_hat < WARN_K}


def warning(name: str, split: str, entry: dict[str, Any]) -> str | None:
    """One line when ``entry``'s s.e. cannot be trusted, else None."""
    tail = entry.get("tail") or {}
    if tail.get("se_trusted") is not False:
        return None
    return (f"sdeflow: warning: {name} on {split}: the s.e. ({entry['bpd_se']:.4f}) cannot be trusted: its "
            f"per-example values have a heavy upper tail (Pareto k = {tail['pareto_k']:.2f} >= {WARN_K}; the "
            f"largest 1% carry {100 * tail['top1pct_share']:.0f}% of the excess over the median); more draws per "
            "example (eval.samples_per_example) or a time proposal matched to the integrand "
            "(eval.time_proposal: fitted) thin it")
