"""Test-set likelihood: ELBO (MATH.md §5) in bits per dimension with its standard error.

Batches are the unit of both randomness and sharding: batch b draws its noise from a generator seeded
by (seed, b) and is evaluated by rank b mod W, so a distributed evaluation reproduces the
single-process one example for example, and every example is counted exactly once.
"""

from __future__ import annotations

import json
import math
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import EvalConfig
from .data import eval_batches, num_examples
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
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + batch) * 1_009 + zlib.crc32(stream.encode()))


def elbo_estimator(cfg: EvalConfig, time_sampler: TimeSampler, samples: int | None = None) -> Estimator:
    k = samples or cfg.samples_per_example

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
    order = torch.argsort(_gather(ctx, index, device))
    log_det = _gather(ctx, log_dets, device)[order]
    out = {name: summarize(_gather(ctx, v, device)[order], log_det, dim, data.transform.bits_offset)
           for name, v in rows.items()}
    for name in out:
        out[name]["seconds"] = seconds[name]  # this rank's estimator time: the cost beside the s.e.
    if data.log_prob is not None:
        out["exact"] = summarize(_gather(ctx, exact, device)[order], None, dim, data.transform.bits_offset)
    return out


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _gather(ctx: DistContext, parts: list[Tensor], device) -> Tensor:
    local = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)
    return ctx.gather(local.to(torch.float64) if local.dtype != torch.long else local)


def write_eval(run_dir: str | Path, results: dict[str, Any], extra: dict[str, Any] | None = None,
               *, merge: bool = False) -> Path:
    """Write eval.json atomically; with ``merge``, estimators evaluated earlier keep their entries."""
    path = Path(run_dir) / EVAL_FILE
    old = json.loads(path.read_text()) if merge and path.exists() else {}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**old, **results, **(extra or {})}, indent=2) + "\n")
    tmp.replace(path)
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
    write_eval(args.run_dir, results, {"split": args.split}, merge=True)
    return 0


__all__ = ["evaluate", "elbo_estimator", "summarize", "num_examples", "write_eval", "format_results"]
