"""Test-set likelihood: ELBO (MATH.md §5) in bits per dimension with its standard error.

Batches are the unit of both randomness and sharding: batch b draws its noise from a generator seeded
by (seed, b) and is evaluated by rank b mod W, so a distributed evaluation reproduces the
single-process one example for example, and every example is counted exactly once.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import derive_seed, write_text_atomic
from .config import EvalConfig
from .data import eval_batches
from .distributed import DistContext
from .elbo import elbo
from .interfaces import DataBundle, TimeSampler
from .transforms import bits_per_dim, mean_and_se

EVAL_FILE = "eval.json"

Estimator = Callable[[Any, Tensor, torch.Generator], Tensor]
"""(model, z, generator) → log-likelihood (or its lower bound) of z per example, in nats."""


def batch_generator(device: torch.device, seed: int, batch: int, stream: str = "data") -> torch.Generator:
    """The random stream of one batch: dequantization noise (``data``) or one estimator's draws, so that
    an estimator sees the same draws whether it runs alone or beside another."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, "eval", batch, stream))


def elbo_estimator(cfg: EvalConfig, time_sampler: TimeSampler, samples: int | None = None) -> Estimator:
    k = cfg.samples_per_example if samples is None else samples

    def estimate(model, z: Tensor, generator: torch.Generator) -> Tensor:
        return elbo(model, z, time_sampler, probe=cfg.probe, samples=k, generator=generator)

    return estimate


def summarize(nll_nats: Tensor, log_det: Tensor | None, dim: int, bits_offset: float) -> dict[str, float]:
    """bpd, its s.e., and the negative log-likelihood in nats per example, from per-example values."""
    log_det = torch.zeros_like(nll_nats) if log_det is None else log_det
    bpd = bits_per_dim(-nll_nats, log_det, dim, bits_offset)
    bpd_mean, bpd_se = mean_and_se(bpd)
    nats, nats_se = mean_and_se(nll_nats - log_det)
    return {"bpd": bpd_mean, "bpd_se": bpd_se, "nats": nats, "nats_se": nats_se, "n": int(bpd.numel())}


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
) -> dict[str, dict[str, float]]:
    """Every estimator's bpd ± s.e. over the split, plus ``exact`` when the data's density is known."""
    ctx = ctx or DistContext(device=device)
    examples = getattr(data, split)
    dim = math.prod(data.shape)
    rows: dict[str, list[Tensor]] = {name: [] for name in estimators}
    seconds = dict.fromkeys(estimators, 0.0)
    log_dets, exact, index = [], [], []
    for b, x in eval_batches(examples, batch_size, max_examples):
        if b % ctx.world != ctx.rank:
            continue
        x = x.to(device)
        z, log_det = data.transform.forward(x, generator=batch_generator(device, seed, b))
        for name, estimate in estimators.items():
            start = _now(device)
            rows[name].append(-estimate(model, z, batch_generator(device, seed, b, name)).double())
            seconds[name] += _now(device) - start
        log_dets.append(log_det.double())
        index.append(torch.arange(b * batch_size, b * batch_size + x.shape[0], device=device))
        if data.log_prob is not None:
            exact.append(-data.log_prob(x).double())
    order = torch.argsort(_gather(ctx, index, device, torch.long))
    log_det = _gather(ctx, log_dets, device)[order]
    out = {name: summarize(_gather(ctx, v, device)[order], log_det, dim, data.transform.bits_offset)
           for name, v in rows.items()}
    for name in out:
        out[name]["seconds"] = seconds[name]  # this rank's estimator time: the cost beside the s.e.
    if data.log_prob is not None:
        out["exact"] = summarize(_gather(ctx, exact, device)[order], None, dim, data.transform.bits_offset)
    for entry in out.values():
        entry["split"] = split
    return out


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _gather(ctx: DistContext, parts: list[Tensor], device, dtype: torch.dtype = torch.float64) -> Tensor:
    """This rank's values concatenated, then every rank's in rank order (a rank may have none)."""
    local = torch.cat(parts).to(dtype) if parts else torch.zeros(0, dtype=dtype, device=device)
    return ctx.gather(local)


def write_eval(run_dir: str | Path, results: dict[str, Any], **extra: Any) -> Path:
    """Merge ``results`` into eval.json (atomically): estimators evaluated earlier keep their entries,
    and each entry says which split and which training step it describes."""
    path = Path(run_dir) / EVAL_FILE
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged.update({name: {**entry, **extra} for name, entry in results.items()})
    write_text_atomic(path, json.dumps(merged, indent=2) + "\n")
    return path


def format_results(results: dict[str, dict[str, float]], kind: str) -> str:
    lines = []
    for name, r in results.items():
        if not isinstance(r, dict) or "bpd" not in r:
            continue
        unit = "bpd" if kind == "image" else "bits/dim"
        line = f"{name:>6}: {r['bpd']:.4f} ± {r['bpd_se']:.4f} {unit}   NLL {r['nats']:.4f} ± {r['nats_se']:.4f} nats"
        cost = f", {r['seconds']:.1f} s" if "seconds" in r else ""
        nfe = f", {r['nfe']:.0f} NFE/batch" if "nfe" in r else ""
        lines.append(line + f"   (n={r['n']}{cost}{nfe})")
    return "\n".join(lines)


def eval_from_cli(args) -> int:
    from .runs import open_run

    run = open_run(args.run_dir)
    results = run.evaluate(split=args.split, max_examples=args.max_examples,
                           samples=args.samples_per_example, estimator=args.estimator,
                           time_sampler=args.time_sampler, batch_size=args.batch_size)
    print(format_results(results, run.data.kind))
    write_eval(args.run_dir, results, step=run.step)
    return 0


