"""Sample quality, each metric reported with its floor (what the data itself scores at that size).

In data space (``swd``, ``mmd``: any data, meant for vectors), samples against half the held-out split:

    value = metric(samples[:m], held_out[:m]),   floor = metric(held_out[m:2m], held_out[:m])

In Inception feature space (``fid``, ``kid``: images, sdeflow.evaluation.inception), ``eval.fid_samples`` samples
(50,000 by default, EMA weights, fixed seeds) against the reference statistics of the training images,
and the held-out split against the same reference as the floor.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from typing import Any, Literal

import torch
from torch import Tensor

from ..components.registry import Registry, default_registry
from ..core.batches import eval_batches, num_examples, take
from ..core.errors import ConfigError, InvalidArgument, did_you_mean
from ..core.seeding import derive_seed
from .inception import InceptionFeatures, Statistics, cache_folder, cached_statistics, find_weights

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
    return unbiased_mmd2(k[:n, :n], k[n:, n:], k[:n, n:])


def unbiased_mmd2(kxx: Tensor, kyy: Tensor, kxy: Tensor) -> float:
    """MMD²_u = mean_{i≠j} k(xᵢ, xⱼ) + mean_{i≠j} k(yᵢ, yⱼ) − 2 mean_{i,j} k(xᵢ, yⱼ) (Gretton et al. 2012, eq. 3)."""
    off = lambda a: (a.sum() - a.diagonal().sum()) / (len(a) * (len(a) - 1))  # noqa: E731
    return float(off(kxx) + off(kyy) - 2 * kxy.mean())


def frechet_distance(a: Statistics, b: Statistics) -> float:
    """FID = ‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½) (Heusel et al. 2017, eq. 6), with
    Tr (Σ_a Σ_b)^½ = Σᵢ √λᵢ(Σ_a^½ Σ_b Σ_a^½), a symmetric eigenproblem with the same eigenvalues."""
    w, v = torch.linalg.eigh(a.sigma)
    root_a = (v * w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root_a @ b.sigma @ root_a).clamp(min=0).sqrt().sum()
    return float((a.mu - b.mu).square().sum() + a.sigma.trace() + b.sigma.trace() - 2 * cross)


def kernel_inception_distance(x: Tensor, y: Tensor, *, generator: torch.Generator, subsets: int = 100,
                              subset_size: int = 1000) -> tuple[float, float]:
    """KID = MMD²_u with k(x, y) = (xᵀy / d + 1)³ (Bińkowski et al. 2018, eq. 8), averaged over
    ``subsets`` random subsets of min(subset_size, n) from each side: (mean, standard deviation)."""
    x, y = x.double(), y.double()
    m = min(subset_size, len(x), len(y))
    values = []
    for _ in range(subsets):
        a = x[torch.randperm(len(x), generator=generator)[:m]]
        b = y[torch.randperm(len(y), generator=generator)[:m]]
        k = lambda p, q: (p @ q.T / x.shape[1] + 1) ** 3  # noqa: E731
        values.append(unbiased_mmd2(k(a, a), k(b, b), k(a, b)))
    values = torch.tensor(values, dtype=torch.float64)
    return float(values.mean()), float(values.std()) if len(values) > 1 else 0.0


class Metric(abc.ABC):
    """A sample-quality metric, registered under the ``metric`` kind (``eval.metrics``) and reported beside
    its floor. ``space`` says what it compares: ``data``, ``compare(samples, held_out, generator=)`` of
    two equal-size batches as they are (→ a float); or ``inception``, ``compare(a, b, generator=)`` of two
    :class:`~sdeflow.evaluation.inception.Statistics` of Inception-v3 features (images only; → a float, or (value,
    {extra JSON fields}))."""

    space: Literal["data", "inception"] = "data"

    @abc.abstractmethod
    def compare(self, a: Any, b: Any, *, generator: torch.Generator) -> float | tuple[float, dict[str, Any]]: ...


def metric(name: str, registry: Registry | None = None) -> Metric:
    """The registered metric ``name``, built with its defaults."""
    return (registry or default_registry()).get("metric", name).factory()


def parse_metrics(names: list[str] | str, registry: Registry | None = None) -> list[str]:
    """``"swd,mmd"`` or a list → the names, checked against the registry; unknown names raise
    :class:`InvalidArgument`."""
    registry = registry or default_registry()
    words = [w.strip() for w in (names.split(",") if isinstance(names, str) else names) if str(w).strip()]
    known = registry.names("metric")
    for word in words:
        try:
            registry.get("metric", word)
        except ConfigError:
            raise InvalidArgument("metrics", f"unknown metric {word!r}; expected a list of "
                                  f"{', '.join(known)}{did_you_mean(word, known)}") from None
    return list(dict.fromkeys(words))


def in_space(names: list[str], space: str, registry: Registry | None = None) -> list[str]:
    """The metrics among ``names`` that compare in ``space`` (data or inception)."""
    return [name for name in names if metric(name, registry).space == space]


def require_images(names: list[str], data, argument: str = "metrics") -> None:
    """fid and kid compare Inception features: :class:`InvalidArgument` unless ``data`` is images."""
    if data.kind != "image":
        raise InvalidArgument(argument, f"{', '.join(names)} compare Inception features of images; this data set "
                              f"gives {data.kind} data (use swd or mmd)")


def check_metrics(exp, data) -> None:
    """Before training: ``eval.metrics`` suits the data (fid and kid need images) and fid and kid have
    their weights, so a run does not fail at its last step. Raises :class:`ConfigError`."""
    names = in_space(parse_metrics(exp.eval.metrics), "inception")
    if not names:
        return
    try:
        require_images(names, data, "eval.metrics")
        find_weights(exp.eval.fid_inception)
    except InvalidArgument as e:
        raise ConfigError(f"{exp.source}: {e.argument}: {e.message}") from None


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
        compare = metric(name).compare
        value = compare(s, a, generator=torch.Generator().manual_seed(seed))
        floor = compare(b, a, generator=torch.Generator().manual_seed(seed))  # the same directions
        out[name] = {"value": float(value), "floor": float(floor), "n": m}
    return out


def run_quality(run, names: list[str], *, split: str = "test", n: int | None = None, seed: int = 0
                ) -> tuple[dict[str, dict[str, Any]], dict]:
    """A built run's samples (its EMA model, sampler, ``sample.lam`` and ``sample.steps``) against its
    held-out ``split``: (quality, the settings that fix it). ``n`` defaults to ``sample.num`` (at most
    half the split) for data-space metrics and to ``eval.fid_samples`` for fid and kid."""
    examples = getattr(run.data, split, None)
    if examples is None:
        raise InvalidArgument("metrics", f"the data set has no {split} split")
    cfg = run.exp.sample
    sampler = run.sampler(cfg.lam)
    settings = {"sampler": dict(run.exp.components["sampler"]), "lam": getattr(sampler, "lam", None),
                "steps": cfg.steps, "seed": seed, "weights": "ema"}
    out: dict[str, dict[str, Any]] = {}
    in_data = in_space(names, "data")
    if in_data:
        m = min(n or cfg.num, num_examples(examples) // 2)
        held_out = take(examples, range(2 * m))
        samples, _ = run.draw(sampler, m, steps=cfg.steps, seed=seed)
        out.update(sample_quality(in_data, samples, held_out, seed))
    in_features = in_space(names, "inception")
    if in_features:
        out.update(inception_quality(run, in_features, sampler, steps=cfg.steps, split=split,
                                     n=n or run.exp.eval.fid_samples, seed=seed))
    return {name: out[name] for name in names}, settings


def inception_quality(run, names: list[str], sampler, *, steps: int | None, split: str, n: int, seed: int
                      ) -> dict[str, dict[str, Any]]:
    """fid and kid of ``n`` samples (``sampler`` at ``steps``) against the reference statistics of the
    training images (cached), and of the held-out ``split`` against the same reference as the floor
    (cached too)."""
    require_images(names, run.data)
    cfg = run.exp.eval
    extractor = InceptionFeatures(find_weights(cfg.fid_inception), run.device)
    folder = cache_folder(cfg.fid_cache)
    data = {"data": dict(run.exp.components["data"])}
    label = data["data"]["name"]
    reference_images = run.data.reference if run.data.reference is not None else run.data.train
    limit = cfg.fid_reference
    reference, reference_file = cached_statistics(
        extractor, (x for _, x in eval_batches(reference_images, cfg.batch_size, limit)),
        key={**data, "split": "reference", "n": limit}, folder=folder, label=f"{label}-reference")
    held_out = getattr(run.data, split)
    floor_n = min(n, num_examples(held_out))
    floor, _ = cached_statistics(extractor, (x for _, x in eval_batches(held_out, cfg.batch_size, floor_n)),
                                 key={**data, "split": split, "n": floor_n}, folder=folder, label=f"{label}-{split}")
    samples = Statistics.of(extractor(x) for x in sample_batches(run, sampler, n, steps, cfg.batch_size, seed))
    described = {"reference": {"images": "training images" if run.data.reference is not None else "train split",
                               "n": reference.n, "cache": str(reference_file)},
                 "extractor": extractor.describe(), "floor_n": floor.n, "batch_size": cfg.batch_size}
    out = {}
    for name in names:
        compare = metric(name).compare
        value, extra = _value(compare(samples, reference, generator=torch.Generator().manual_seed(seed)))
        floor_value, _ = _value(compare(floor, reference, generator=torch.Generator().manual_seed(seed)))
        out[name] = {"value": value, "floor": floor_value, "n": samples.n, **extra, **described}
    return out


def _value(result: float | tuple[float, dict[str, Any]]) -> tuple[float, dict[str, Any]]:
    return (float(result[0]), dict(result[1])) if isinstance(result, tuple) else (float(result), {})


def sample_batches(run, sampler, n: int, steps: int | None, batch_size: int, seed: int) -> Iterator[Tensor]:
    """``n`` samples in data space, ``batch_size`` at a time, batch b drawn with seed (seed, b)."""
    for b, start in enumerate(range(0, n, batch_size)):
        x, _ = run.draw(sampler, min(batch_size, n - start), steps=steps, seed=derive_seed(seed, "quality-batch", b))
        yield x


def _flat(x: Tensor) -> Tensor:
    x = x.detach().double().cpu()
    return x.reshape(len(x), -1) if x.ndim > 1 else x[:, None]


def format_quality(quality: dict[str, dict[str, float]], split: str) -> str:
    """One line a metric: its value, its floor and (when the floor is positive) their ratio."""
    lines = []
    for name, q in quality.items():
        ratio = f"; {q['value'] / q['floor']:.2f}× the floor" if q["floor"] > 0 else ""
        if "floor_n" in q:  # an Inception metric: the floor is the held-out split against the reference
            floor = f"floor {q['floor']:.4f}: {q['floor_n']} {split} images vs the reference, n={q['n']}{ratio}"
        else:
            floor = f"floor {q['floor']:.4f}: two halves of {split}, n={q['n']}{ratio}"
        lines.append(f"{name:>5}: {q['value']:.4f}   ({floor})")
    return "\n".join(lines)
