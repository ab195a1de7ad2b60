"""Held-out likelihood: ELBO (MATH.md §5) in bits per dimension, per example and summarised with its s.e.

Batches are the unit of both randomness and sharding: batch b draws its noise from a generator seeded
by (seed, b) and is evaluated by rank b mod W, so a distributed evaluation reproduces the
single-process one example for example, and every example is counted exactly once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..core.batches import eval_batches, num_examples, take
from ..core.distributed import DistContext
from ..core.errors import SdeflowError
from ..core.interfaces import DataBundle, TimeSampler
from ..core.seeding import derive_seed
from ..core.statistics import mean_and_se, tail_diagnostic
from ..core.statistics import warning as tail_warning
from ..core.transforms import ModelSpace, bits_per_dim
from ..experiment.config import EvalConfig
from ..likelihood.estimators import make_estimators, prepare_all

Estimator = Callable[[Any, Tensor, torch.Generator], Tensor]
"""(model, z, generator) → log-likelihood (or its lower bound) of z per example, in nats."""


def batch_generator(device: torch.device, seed: int, batch: int, stream: str = "data") -> torch.Generator:
    """The random stream of one batch: dequantization noise (``data``) or one estimator's draws, so that
    an estimator sees the same draws whether it runs alone or beside another."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, "eval", batch, stream))


def elbo_estimator(cfg: EvalConfig, time_sampler: TimeSampler, samples: int | None = None) -> Estimator:
    """The ``elbo`` estimator of :mod:`sdeflow.likelihood.estimators` (MATH.md §5) with ``cfg``'s settings."""
    return make_estimators(["elbo"], cfg, time_sampler, samples=samples)["elbo"]


def summarize(nll_nats: Tensor, log_det: Tensor | None, dim: int, bits_offset: float,
              index: Tensor | None = None, log_q: Tensor | None = None) -> dict[str, Any]:
    """bpd, its s.e., and the negative log-likelihood of the data in nats, from per-example values of
    −log p(z), log|det ∂z/∂x̃| and log q(u | x) (None: 0). ``nats`` is the same number as the bpd, bpd·D·ln 2
    (−log P(x) for discrete data, bin offset included; −log p(x) for continuous data); ``model_nats`` is
    −log p(z) in the model's own space (before the Jacobian, the dequantizer and the bin offset), labelled
    so it is not read as the data's. ``examples`` holds the per-example values (index in the split, nats of
    the data, bpd)."""
    log_det = torch.zeros_like(nll_nats) if log_det is None else log_det
    log_q = torch.zeros_like(nll_nats) if log_q is None else log_q
    bpd = bits_per_dim(-nll_nats, log_det, dim, bits_offset, log_q)
    bpd_mean, bpd_se = mean_and_se(bpd)
    nats_x = bpd * (dim * math.log(2))
    nats, nats_se = mean_and_se(nats_x)
    model_nats, model_nats_se = mean_and_se(nll_nats)
    index = torch.arange(bpd.numel()) if index is None else index
    return {"bpd": bpd_mean, "bpd_se": bpd_se, "nats": nats, "nats_se": nats_se, "model_nats": model_nats,
            "model_nats_se": model_nats_se, "n": int(bpd.numel()), "tail": tail_diagnostic(bpd),
            "examples": {"index": index.cpu(), "nats": nats_x.cpu(), "bpd": bpd.cpu()}}


class NonFiniteEvaluation(SdeflowError):
    """An estimator returned NaN or ±inf for some examples: an error, never a result."""


def check_finite(name: str, split: str, nll: Tensor, index: Tensor) -> None:
    bad = ~torch.isfinite(nll)
    if bad.any():
        first = index[bad][:5].tolist()
        raise NonFiniteEvaluation(f"{name} on the {split} split is not finite for {int(bad.sum())} of "
                                  f"{nll.numel()} examples (first: {first}); the model or its settings "
                                  "are broken (e.g. an infinite or NaN parameter); nothing was recorded")


@torch.no_grad()
def evaluate(
    model,
    data: DataBundle,
    estimators: dict[str, Estimator],
    *,
    batch_size: int,
    seed: int,
    device: torch.device,
    ctx: DistContext | None = None,
    split: str = "test",
    max_examples: int | None = None,
    pilot_examples: int = 256,
    space: ModelSpace | None = None,
) -> dict[str, dict[str, float]]:
    """Every estimator's bpd ± s.e. over the split, plus ``exact`` when the data's density is known.
    ``space`` takes data to model space (dequantizer and transform; None: the transform of continuous data).

    Estimators with something to fit (``prepare``) first see a pilot batch: the first
    ``pilot_examples`` training examples, dequantized with a stream of their own, so nothing is fitted
    on the examples being evaluated and every variant of a sweep fits on the same examples.
    """
    ctx = ctx or DistContext(device=device)
    space = space or ModelSpace(data.transform, data.levels)
    examples = getattr(data, split, None)
    if examples is None:
        raise SdeflowError(f"the data set has no {split} split")
    prepare_on_pilot(estimators, model, data, pilot_examples=pilot_examples, seed=seed, device=device, space=space)
    dim = math.prod(data.shape)
    rows: dict[str, list[Tensor]] = {name: [] for name in estimators}
    seconds = dict.fromkeys(estimators, 0.0)
    log_dets, log_qs, exact, index = [], [], [], []
    for b, x in eval_batches(examples, batch_size, max_examples):
        if b % ctx.world != ctx.rank:
            continue
        x = x.to(device)
        nll, log_det, log_q = batch_nll(model, space, estimators, x, batch=b, seed=seed, device=device,
                                        seconds=seconds)
        for name, values in nll.items():
            rows[name].append(values)
        log_dets.append(log_det)
        log_qs.append(log_q)
        index.append(torch.arange(b * batch_size, b * batch_size + x.shape[0], device=device))
        if data.log_prob is not None:
            exact.append(-data.log_prob(x).double())
    out = _summaries(ctx, device, rows, log_dets, log_qs, index, exact if data.log_prob is not None else None,
                     dim, space.bits_offset, split)
    for name in rows:
        out[name]["seconds"] = seconds[name]  # this rank's estimator time: the cost beside the s.e.
    total = num_examples(examples)
    for entry in out.values():
        entry["split"] = split
        entry["full"] = entry["n"] == total
    return out


def prepare_on_pilot(estimators: dict[str, Estimator], model, data: DataBundle, *, pilot_examples: int, seed: int,
                     device: torch.device, space: ModelSpace) -> None:
    """Fit what the estimators fit (``prepare``) on the pilot batch, when any of them has something to fit."""
    if any(getattr(e, "needs_pilot", False) for e in estimators.values()):
        prepare_all(estimators, model, pilot_batch(data, space, pilot_examples, seed, device), seed=seed)


def batch_nll(model, space: ModelSpace, estimators: dict[str, Estimator], x: Tensor, *, batch: int, seed: int,
              device: torch.device, seconds: dict[str, float] | None = None
              ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Batch number ``batch`` of an evaluation, x in data space: ({estimator: −(bound on) log p(z) per
    example}, log|det ∂z/∂x̃|, log q(u | x)), all float64. The dequantizer's and each estimator's draws
    come from their own streams of (seed, batch), so a batch gets the same numbers alone or inside a split."""
    z, log_det, log_q = space(x, generator=batch_generator(device, seed, batch))
    nll = {}
    for name, estimate in estimators.items():
        start = _now(device)
        generator = batch_generator(device, seed, batch, name)
        if getattr(estimate, "repeats", 1) == 1:
            nll[name] = -estimate(model, z, generator).double()
        else:
            nll[name] = -repeated(estimate, model, space, x, (z, log_det, log_q), generator,
                                  lambda k: batch_generator(device, seed, batch, f"data-repeat-{k}"))
        if seconds is not None:
            seconds[name] += _now(device) - start
    return nll, log_det.double(), log_q.double()


def repeated(estimate, model, space: ModelSpace, x: Tensor, first: tuple[Tensor, Tensor, Tensor], generator,
             data_generator) -> Tensor:
    """log p(z) of the first draw's z such that the bpd of :func:`summarize` is that of ``estimate.repeats``
    solves, each on its own dequantization draw (the first is ``first``), combined in data space:
    the mean of log p(x̃_k) − log q(u_k | x) (each a bound; so is their mean), or their log-mean-exp
    (``combine: logmeanexp``, the importance-weighted bound over the dequantization draws of i-DODE and
    MuLAN, valid when each log p(x̃_k) is exact, as the ODE's is up to its tolerance and probe)."""
    _, log_det0, log_q0 = first
    draws = []
    for k in range(estimate.repeats):
        z, log_det, log_q = first if k == 0 else space(x, generator=data_generator(k))
        draws.append(estimate(model, z, generator).double() + log_det.double() - log_q.double())
    stacked = torch.stack(draws)
    if estimate.combine == "logmeanexp":
        combined = torch.logsumexp(stacked, dim=0) - math.log(len(draws))
    else:
        combined = stacked.mean(dim=0)
    return combined - log_det0.double() + log_q0.double()


def _summaries(ctx: DistContext, device, rows: dict[str, list[Tensor]], log_dets: list[Tensor], log_qs: list[Tensor],
               index: list[Tensor], exact: list[Tensor] | None, dim: int, bits_offset: float, split: str
               ) -> dict[str, dict[str, Any]]:
    """Every rank's per-example values gathered in example order, checked finite and summarised (and
    the data's exact negative log-likelihood beside them, when it has one)."""
    all_index = _gather(ctx, index, device, torch.long)
    order = torch.argsort(all_index)
    all_index = all_index[order]
    log_det = _gather(ctx, log_dets, device)[order]
    log_q = _gather(ctx, log_qs, device)[order]
    nll = {name: _gather(ctx, v, device)[order] for name, v in rows.items()}
    for name, values in nll.items():
        check_finite(name, split, values, all_index)
    out = {name: summarize(values, log_det, dim, bits_offset, all_index, log_q) for name, values in nll.items()}
    if exact is not None:
        out["exact"] = summarize(_gather(ctx, exact, device)[order], None, dim, bits_offset, all_index)
    return out


def pilot_batch(data: DataBundle, space: ModelSpace, n: int, seed: int, device: torch.device) -> Tensor:
    """The first ``n`` training examples in model space (dequantized with the ``pilot`` stream)."""
    x = take(data.train, range(min(n, num_examples(data.train)))).to(device)
    z, _, _ = space(x, generator=batch_generator(device, seed, -1, "pilot"))
    return z


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _gather(ctx: DistContext, parts: list[Tensor], device, dtype: torch.dtype = torch.float64) -> Tensor:
    """This rank's values concatenated, then every rank's in rank order (a rank may have none)."""
    local = torch.cat(parts).to(dtype) if parts else torch.zeros(0, dtype=dtype, device=device)
    return ctx.gather(local)


def _se(se: float | None) -> str:
    return "n/a (one example)" if se is None else f"{se:.4f}"


def format_results(results: dict[str, dict[str, float]], kind: str) -> str:
    """One line per estimator (bpd ± s.e., NLL, cost), after the dequantizer the bpd assumes, if any."""
    dequantizers = {r["protocol"]["dequantizer"]["name"] for r in results.values()
                    if isinstance(r, dict) and "dequantizer" in r.get("protocol", {})}
    lines = [f"  (dequantizer: {', '.join(sorted(dequantizers))})"] if dequantizers else []
    for name, r in results.items():
        if not isinstance(r, dict) or "bpd" not in r:
            continue
        unit = "bpd" if kind == "image" else "bits/dim"
        line = (f"{name:>6}: {r['bpd']:.4f} ± {_se(r['bpd_se'])} {unit}   NLL {r['nats']:.4f} ± {_se(r['nats_se'])} "
                "nats of the data")
        cost = f", {r['seconds']:.1f} s" if "seconds" in r else ""
        nfe = f", {r['nfe']:.0f} NFE/batch" if "nfe" in r else ""
        lines.append(line + f"   (n={r['n']}{cost}{nfe})")
        warn = tail_warning(name, r.get("split", "the split"), r)
        if warn:
            lines.append(warn)
    return "\n".join(lines)
