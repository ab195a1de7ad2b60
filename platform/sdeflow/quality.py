"""Sample quality of vector data against held-out examples: the sliced Wasserstein distance and the
MMD, each reported with its floor, the same metric between two disjoint halves of the held-out split
(what a perfect sampler would score at that sample size).

    value = metric(samples[:m], held_out[:m]),   floor = metric(held_out[m:2m], held_out[:m])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .data import num_examples, take
from .errors import InvalidArgument

PROJECTIONS = 512


def sliced_wasserstein(x: Tensor, y: Tensor, *, generator: torch.Generator, projections: int = PROJECTIONS) -> float:
    """SW₂(x, y) = (E_θ W₂²(θᵀx, θᵀy))^½ over uniform unit directions θ (Bonneel et al. 2015), each 1-D W₂
    between equal-size samples by matching sorted projections."""
    x, y = _flat(x), _flat(y)
    theta = torch.randn(x.shape[1], projections, generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x @ theta, dim=0)
    py, _ = torch.sort(y @ theta, dim=0)
    return float(((px - py) ** 2).mean().sqrt())


def mmd(x: Tensor, y: Tensor, *, generator: torch.Generator | None = None, scales: tuple[float, ...] = (0.5, 1.0, 2.0),
        h2: float | None = None) -> float:
    """Unbiased MMD²(x, y) (Gretton et al. 2012, eq. 3) with k = Σ_s exp(−‖x − y‖² / (2 s² h²)), h² the
    median squared distance of the pooled samples unless given."""
    x, y = _flat(x), _flat(y)
    pooled = torch.cat([x, y])
    d2 = torch.cdist(pooled, pooled).pow(2)
    if h2 is None:
        h2 = float(d2[torch.triu_indices(len(pooled), len(pooled), 1).unbind()].median().clamp(min=1e-12))
    k = sum(torch.exp(-d2 / (2 * s**2 * h2)) for s in scales)
    n = len(x)
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    off = lambda a: (a.sum() - a.diagonal().sum()) / (len(a) * (len(a) - 1))  # noqa: E731
    return float(off(kxx) + off(kyy) - 2 * kxy.mean())


METRICS: dict[str, Callable[..., float]] = {"swd": sliced_wasserstein, "mmd": mmd}


def parse_metrics(names: list[str] | str) -> list[str]:
    """``"swd,mmd"`` or a list → the names, checked; unknown names raise :class:`InvalidArgument`."""
    words = [w.strip() for w in (names.split(",") if isinstance(names, str) else names) if str(w).strip()]
    for word in words:
        if word not in METRICS:
            raise InvalidArgument("metrics", f"unknown metric {word!r}; expected a list of {', '.join(METRICS)}"
                                  + (" (fid and kid, for images, are not built yet)" if word in ("fid", "kid") else ""))
    return list(dict.fromkeys(words))


def sample_quality(names: list[str], samples: Tensor, held_out: Tensor, seed: int) -> dict[str, dict[str, float]]:
    """{metric: {value, floor, n}}: samples against the first half of ``held_out``, and the second half
    against the first as the floor; ``n`` is the size of each side."""
    m = min(len(samples), len(held_out) // 2)
    if m < 2:
        raise InvalidArgument("metrics", f"need at least 4 held-out examples and 2 samples, got {len(held_out)} "
                              f"and {len(samples)}")
    a, b, s = held_out[:m], held_out[m:2 * m], samples[:m]
    out = {}
    for name in names:
        metric = METRICS[name]
        value = metric(s, a, generator=torch.Generator().manual_seed(seed))
        floor = metric(b, a, generator=torch.Generator().manual_seed(seed))  # the same directions
        out[name] = {"value": value, "floor": floor, "n": m}
    return out


def run_quality(run, names: list[str], *, split: str = "test", n: int | None = None, seed: int = 0
                ) -> tuple[dict[str, dict[str, float]], dict]:
    """A built run's samples (its EMA model, sampler, ``sample.lam`` and ``sample.steps``) against its
    held-out ``split``: (quality, the settings that fix it). ``n`` defaults to ``sample.num``, at most
    half the split."""
    examples = getattr(run.data, split, None)
    if examples is None:
        raise InvalidArgument("metrics", f"the data set has no {split} split")
    total = num_examples(examples)
    n = min(n or run.exp.sample.num, total // 2)
    held_out = take(examples, range(2 * n))
    cfg = run.exp.sample
    sampler = run.sampler(cfg.lam)
    samples, _ = run.draw(sampler, n, steps=cfg.steps, seed=seed)
    settings = {"sampler": dict(run.exp.components["sampler"]), "lam": getattr(sampler, "lam", None),
                "steps": cfg.steps, "n": n, "seed": seed, "weights": "ema"}
    return sample_quality(names, samples, held_out, seed), settings


def _flat(x: Tensor) -> Tensor:
    x = x.detach().double().cpu()
    return x.reshape(len(x), -1) if x.ndim > 1 else x[:, None]


def format_quality(quality: dict[str, dict[str, float]], split: str) -> str:
    """One line a metric: its value, its floor and (when the floor is positive) their ratio."""
    lines = []
    for name, q in quality.items():
        ratio = f"; {q['value'] / q['floor']:.2f}× the floor" if q["floor"] > 0 else ""
        floor = f"floor {q['floor']:.4f}: two halves of {split}, n={q['n']}{ratio}"
        lines.append(f"{name:>5}: {q['value']:.4f}   ({floor})")
    return "\n".join(lines)
