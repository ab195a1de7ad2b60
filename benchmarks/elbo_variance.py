"""How noisy is the test ELBO, and what does lowering the noise cost? Uniform vs debiased t, K samples.

    python benchmarks/elbo_variance.py RUN_DIR [--max-examples 512] [--samples 1,4,16] [--repeats 3]
    python benchmarks/elbo_variance.py RUN_DIR --estimators [--estimator-k 4]
    python benchmarks/elbo_variance.py --suite FOLDER [--threads 2]
    python benchmarks/elbo_variance.py --write-blob-mnist ROOT [--n-train 512 --n-test 128]

For every time sampler (uniform, debiased: MATH.md §6) and every K (samples per example), the same
test examples are evaluated ``--repeats`` times with independent noise (t, Y_t, Y_T, probe and, for
images, the dequantization), through the run's own estimators (what ``sdeflow eval`` computes). Columns:

    bpd       test-set mean (all repeats pooled)
    s.e.      its standard error std / √N over examples, from the first repeat, as ``sdeflow eval``
              reports it: the spread of the data plus the estimator's own noise
    MC sd     the estimator's own noise per example, in bpd: √(mean over examples of the variance
              across repeats); independent of how different the examples are
    time      wall seconds for one pass over the examples (the fastest pass)
    @eq       MC sd × √(time / time of uniform K = 1): the noise per example at EQUAL COMPUTE, i.e. as
              if the 1-sample uniform estimator had been averaged over as many passes as fit in that time

Then the probability-flow ODE (MATH.md §7): bpd ± s.e., MC sd (when repeated), NFE per batch, time.

``--estimators`` adds, for the run, every estimator of ``sdeflow.likelihood.estimators`` (elbo, dsm_elbo, combined_elbo)
× time proposal (uniform, debiased, debiased stratified, fitted, fitted stratified) at K = ``--estimator-k``,
against the reference (elbo, uniform t, K = 1): the same columns, then ``gain`` = the reference's MC sd@eq /
the row's, i.e. how many times smaller its per-example noise is at equal wall time. Fitting (a pilot pass
on the first ``eval.pilot_examples`` training examples) is done once per row and not counted in ``time``.

``--suite FOLDER`` trains three small models briefly into FOLDER (kept, so a second run only evaluates):
the Swiss roll, a 16-D Gaussian (exact log-density known) and blob-MNIST (below), and prints that table
for each, with whether the goal is met: at equal wall time, the best estimator's per-example noise ≥ 3×
smaller than the reference's on blob-MNIST and ≥ 1.5× on the Swiss roll. A few minutes on 2 CPU cores.

``--write-blob-mnist ROOT`` writes a tiny MNIST-format data set (IDX files under ROOT/MNIST/raw) of
digit-like blobs — a few Gaussian strokes on a black background, so most pixels are exactly 0 as in
MNIST — for training a small image model offline (``data: {name: mnist, root: ROOT, download: false}``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import struct
import sys
import time
from pathlib import Path

import attrs
import numpy as np
import torch

from sdeflow.assembly.run import open_run
from sdeflow.components.registry import default_registry
from sdeflow.core.batches import eval_batches
from sdeflow.core.statistics import mean_and_se
from sdeflow.core.transforms import bits_per_dim
from sdeflow.evaluation.evaluate import batch_generator
from sdeflow.experiment.config import structure
from sdeflow.likelihood.estimators import make_estimators, pilot_generator
from sdeflow.rundir.folder import LAST
from sdeflow.training.trainer import train

TIME_SAMPLERS = ("uniform", "debiased")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", nargs="?", help="a trained run folder")
    parser.add_argument("--max-examples", type=int, default=512, help="test examples (default 512)")
    parser.add_argument("--batch-size", type=int, default=None, help="examples per batch (default: eval.batch_size)")
    parser.add_argument("--samples", default="1,4,16", help="comma-separated K (samples per example)")
    parser.add_argument("--repeats", type=int, default=3, help="independent passes per estimator (≥ 2 for MC sd)")
    parser.add_argument("--ode-repeats", type=int, default=1, help="passes of the ODE estimator (0: skip it)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--estimators", action="store_true", help="also every estimator × time proposal")
    parser.add_argument("--estimator-k", type=int, default=4, help="K of the estimator × proposal rows")
    parser.add_argument("--suite", metavar="FOLDER", help="train three small models into FOLDER and compare")
    parser.add_argument("--write-blob-mnist", metavar="ROOT", help="write a blob data set in MNIST format and exit")
    parser.add_argument("--n-train", type=int, default=512)
    parser.add_argument("--n-test", type=int, default=128)
    return parser.parse_args(argv)


# ------------------------------------------------------------------ estimating


class Bench:
    """One run, its first ``max_examples`` test examples, and timed passes of an estimator over them."""

    def __init__(self, run_dir: str, max_examples: int, batch_size: int | None):
        self.run = open_run(run_dir)
        self.run.ema.eval()
        self.space, _ = self.run.space()  # the run's dequantizer and transform
        batch_size = batch_size or self.run.exp.eval.batch_size
        self.batches = list(eval_batches(self.run.data.test, batch_size, max_examples))
        self.dim = math.prod(self.run.data.shape)

    @torch.no_grad()
    def bpd(self, estimate, seed: int) -> torch.Tensor:
        """Per-example bpd of one pass; batch b's noise comes from (seed, b), as in ``sdeflow eval``."""
        run, space, out = self.run, self.space, []
        for b, x in self.batches:
            generator = batch_generator(run.device, seed, b)
            z, log_det, log_q = space(x.to(run.device), generator=generator)
            log_p = estimate(run.ema, z, generator)
            out.append(bits_per_dim(log_p.double(), log_det.double(), self.dim, space.bits_offset, log_q.double()))
        return torch.cat(out).cpu()

    def timed_passes(self, estimate, repeats: int, warmup_examples: int | None = None) -> tuple[torch.Tensor, float]:
        """(per-example bpd of every pass, shape (repeats, N); seconds of the fastest pass, which other
        load on a shared machine disturbs least) after an untimed warm-up on the first ``warmup_examples``
        examples (default: the whole first batch)."""
        self.warm_up(estimate, warmup_examples)
        values, seconds = [], []
        for r in range(repeats):
            start = time.perf_counter()
            values.append(self.bpd(estimate, seed=1000 + r))
            synchronize(self.run.device)
            seconds.append(time.perf_counter() - start)
        return torch.stack(values), min(seconds)

    @torch.no_grad()
    def warm_up(self, estimate, examples: int | None) -> None:
        _, x = self.batches[0]
        z, _, _ = self.space(x[:examples].to(self.run.device))
        estimate(self.run.ema, z, batch_generator(self.run.device, 999, 0))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(values: torch.Tensor) -> dict[str, float]:
    """bpd, test-set s.e. (first pass), and the per-example MC sd across passes."""
    mean, _ = mean_and_se(values.flatten())
    _, se = mean_and_se(values[0])
    mc_sd = float(values.var(dim=0, unbiased=True).mean().sqrt()) if values.shape[0] > 1 else float("nan")
    return {"bpd": mean, "se": se, "mc_sd": mc_sd}


# ------------------------------------------------------------------ the report


def elbo_table(bench: Bench, samples: list[int], repeats: int) -> list[dict]:
    rows = []
    for sampler in TIME_SAMPLERS:
        for k in samples:
            estimate = bench.run.estimators("elbo", time_sampler=sampler, samples=k)["elbo"]
            values, seconds = bench.timed_passes(estimate, repeats)
            rows.append({"sampler": sampler, "K": k, "time": seconds, **summarize(values)})
            print(f"  ... {sampler} K={k}: {seconds:.2f} s", file=sys.stderr, flush=True)
    reference = next(r for r in rows if r["sampler"] == "uniform" and r["K"] == 1)
    for row in rows:
        cost = row["time"] / reference["time"]
        row["mc_sd_eq"] = row["mc_sd"] * math.sqrt(cost)
        row["se_eq"] = row["se"] * math.sqrt(cost)
    return rows


def print_header(bench: Bench) -> None:
    run, cfg = bench.run, bench.run.exp.eval
    n = sum(len(x) for _, x in bench.batches)
    components = {kind: spec.get("name") for kind, spec in run.exp.components.items()}
    print(f"run {run.run_dir} ({run.exp.name}): data {components.get('data')} D={bench.dim}, "
          f"network {components.get('network')}, sde {components.get('sde')}")
    print(f"{n} test examples in {len(bench.batches)} batches; probe {cfg.probe}; device {run.device}, "
          f"{torch.get_num_threads()} threads")


def print_elbo_table(rows: list[dict]) -> None:
    print(f"\n{'ELBO':<9}{'K':>3} {'bpd':>9} {'s.e.':>8} {'MC sd':>8} {'time s':>8}"
          f" {'MC sd@eq':>9} {'s.e.@eq':>8}")
    for r in rows:
        print(f"{r['sampler']:<9}{r['K']:>3} {r['bpd']:>9.4f} {r['se']:>8.4f} {r['mc_sd']:>8.4f} "
              f"{r['time']:>8.3f} {r['mc_sd_eq']:>9.4f} {r['se_eq']:>8.4f}")
    print("@eq: × √(time / time of uniform K=1), the noise at the compute of one uniform sample")


def print_ode(bench: Bench, repeats: int) -> None:
    estimate = bench.run.estimators("ode")["ode"]
    values, seconds = bench.timed_passes(estimate, repeats, warmup_examples=2)  # a solve is slow: keep it short
    row = summarize(values)
    nfe = sum(estimate.nfe[1:]) / max(1, len(estimate.nfe) - 1)  # [0] is the warm-up solve
    mc = f"   MC sd {row['mc_sd']:.4f}" if repeats > 1 else ""
    print(f"\nODE      bpd {row['bpd']:.4f} ± {row['se']:.4f} (s.e.){mc}   NFE {nfe:.0f} per batch   "
          f"time {seconds:.2f} s")


# ------------------------------------------------------------------ estimators × time proposals

PROPOSALS = {  # name: (eval.time_sampler, eval.time_proposal, eval.stratify_time)
    "uniform": ("uniform", "sampler", False),
    "debiased": ("debiased", "sampler", False),
    "debiased-strat": ("debiased", "sampler", True),
    "fitted": ("debiased", "fitted", False),
    "fitted-strat": ("debiased", "fitted", True),
}
ESTIMATORS = ("elbo", "dsm_elbo", "combined_elbo")


def build_estimator(bench: Bench, name: str, proposal: str, k: int):
    """One estimator of sdeflow.likelihood.estimators, prepared on a pilot of training examples (untimed)."""
    sampler, time_proposal, stratify = PROPOSALS[proposal]
    run = bench.run
    cfg = attrs.evolve(run.exp.eval, time_sampler=sampler, time_proposal=time_proposal, stratify_time=stratify)
    ts = run.registry.get("time_sampler", sampler).factory()
    estimate = make_estimators([name], cfg, ts, samples=k, sde=run.ema.sde)[name]
    start = time.perf_counter()
    x = next(iter(eval_batches(run.data.train, cfg.pilot_examples, cfg.pilot_examples)))[1].to(run.device)
    z, _, _ = bench.space(x, generator=pilot_generator(run.device, 0, "pilot data"))
    estimate.prepare(run.ema, z, pilot_generator(run.device, 0, name))
    return estimate, time.perf_counter() - start


def estimator_table(bench: Bench, k: int, repeats: int) -> list[dict]:
    rows = []
    configs = [("elbo", "uniform", 1)] + [(e, p, k) for e in ESTIMATORS for p in PROPOSALS]
    for name, proposal, samples in configs:
        estimate, pilot = build_estimator(bench, name, proposal, samples)
        values, seconds = bench.timed_passes(estimate, repeats)
        rows.append({"estimator": name, "proposal": proposal, "K": samples, "time": seconds, "pilot": pilot,
                     **summarize(values)})
        print(f"  ... {name} {proposal} K={samples}: {seconds:.2f} s", file=sys.stderr, flush=True)
    reference = rows[0]
    for row in rows:
        row["mc_sd_eq"] = row["mc_sd"] * math.sqrt(row["time"] / reference["time"])
        row["gain"] = reference["mc_sd_eq"] / row["mc_sd_eq"]
    return rows


def print_estimator_table(rows: list[dict], exact: float | None = None) -> None:
    print(f"\n{'estimator':<14}{'proposal':<15}{'K':>3} {'bpd':>9} {'s.e.':>8} {'MC sd':>8} {'time s':>7}"
          f" {'pilot s':>7} {'MC sd@eq':>9} {'gain':>6}")
    for r in rows:
        print(f"{r['estimator']:<14}{r['proposal']:<15}{r['K']:>3} {r['bpd']:>9.4f} {r['se']:>8.4f} "
              f"{r['mc_sd']:>8.4f} {r['time']:>7.3f} {r['pilot']:>7.2f} {r['mc_sd_eq']:>9.4f} {r['gain']:>6.2f}")
    if exact is not None:
        print(f"exact bpd {exact:.4f}")
    print("MC sd@eq: per-example noise × √(time / reference time); gain: reference MC sd@eq / row's")


# ------------------------------------------------------------------ the suite: three small models


def suite_configs(folder: Path) -> dict[str, dict]:
    """Brief trainings (DSM, uniform t, VP) of the Swiss roll, a 16-D Gaussian and blob-MNIST."""
    common = {"seed": 0, "device": "cpu", "sde": {"name": "vp"}, "loss": {"name": "dsm", "weighting": "sigma2"},
              "logging": {"progress": False, "tensorboard": False}, "sample": {"num": 4}}
    vector_train = {"batch_size": 512, "lr": 1e-3, "ema": 0.99, "log_every": 500}
    blob_data = {"name": "mnist", "root": str(folder / "blob"), "download": False, "logit_alpha": 0.05}
    if "n_val" in default_registry().get("data", "mnist").arguments:
        blob_data["n_val"] = 128
    return {
        "swissroll": {**common, "data": {"name": "swissroll", "n": 20000, "n_test": 1000},
                      "network": {"name": "mlp", "hidden": 128, "depth": 3},
                      "train": {**vector_train, "steps": 1500, "checkpoint_every": 1500},
                      "eval": {"batch_size": 1000, "max_examples": 16}},
        "gaussian16": {**common, "data": {"name": "gaussian", "dim": 16, "n": 20000, "n_test": 1000},
                       "network": {"name": "mlp", "hidden": 128, "depth": 2},
                       "train": {**vector_train, "steps": 1000, "checkpoint_every": 1000},
                       "eval": {"batch_size": 1000, "max_examples": 16}},
        "blob_mnist": {**common, "data": blob_data,
                       "network": {"name": "unet", "ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1,
                                   "attn_resolutions": [], "num_groups": 8},
                       "train": {"steps": 400, "batch_size": 32, "lr": 2e-3, "ema": 0.99, "log_every": 100,
                                 "checkpoint_every": 400},
                       "eval": {"batch_size": 128, "max_examples": 16}},
    }


def run_suite(folder: str, k: int, repeats: int) -> None:
    folder = Path(folder)
    if not (folder / "blob" / "MNIST" / "raw").exists():
        write_blob_mnist(str(folder / "blob"), 2048, 256)
    goals = {"swissroll": 1.5, "blob_mnist": 3.0}
    for name, config in suite_configs(folder).items():
        run_dir = folder / name
        if not (run_dir / LAST).exists():
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                train(structure({"name": name, **config}, name, default_registry()), run_dir, restart=True)
            print(f"  ... trained {name} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        examples = 128 if name == "blob_mnist" else 1000
        bench = Bench(str(run_dir), examples, None)
        print()
        print_header(bench)
        rows = estimator_table(bench, k, repeats)
        exact = None
        if bench.run.data.log_prob is not None:
            x = torch.cat([x for _, x in bench.batches])
            exact = mean_and_se(bits_per_dim(bench.run.data.log_prob(x).double(), torch.zeros(len(x)),
                                             bench.dim, 0.0))[0]
        print_estimator_table(rows, exact)
        best = max(rows[1:], key=lambda r: r["gain"])
        goal = goals.get(name)
        verdict = "" if goal is None else f"; goal ≥ {goal}×: {'met' if best['gain'] >= goal else 'NOT met'}"
        print(f"best: {best['estimator']} {best['proposal']} K={best['K']}, {best['gain']:.2f}× less noise "
              f"than the reference at equal wall time{verdict}")


# ------------------------------------------------------------------ a blob data set in MNIST format


def blob_images(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 28, 28) uint8: 2–4 elongated Gaussian strokes each, thresholded so the background is 0."""
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float64)
    images = np.zeros((n, 28, 28))
    for i in range(n):
        for _ in range(rng.integers(2, 5)):
            cy, cx = rng.uniform(7, 21, size=2)
            angle, length, width = rng.uniform(0, np.pi), rng.uniform(3, 7), rng.uniform(0.9, 1.6)
            u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
            v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
            images[i] = np.maximum(images[i], np.exp(-0.5 * ((u / length) ** 2 + (v / width) ** 2)))
    images = np.where(images > 0.05, images, 0.0)
    return np.clip(np.round(255 * images), 0, 255).astype(np.uint8)


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX of unsigned bytes (what torchvision's MNIST reads): 0 0 8 ndim, big-endian dims, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_blob_mnist(root: str, n_train: int, n_test: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", blob_images(n, rng))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, size=n, dtype=np.uint8))
    return raw


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.write_blob_mnist:
        print(f"wrote {write_blob_mnist(args.write_blob_mnist, args.n_train, args.n_test)}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.suite:
        run_suite(args.suite, args.estimator_k, args.repeats)
        return 0
    if not args.run_dir:
        sys.exit("elbo_variance.py: a run folder is required (or --suite FOLDER, --write-blob-mnist ROOT)")
    bench = Bench(args.run_dir, args.max_examples, args.batch_size)
    print_header(bench)
    samples = [int(k) for k in args.samples.split(",")]
    print_elbo_table(elbo_table(bench, samples, args.repeats))
    if args.estimators:
        print_estimator_table(estimator_table(bench, args.estimator_k, args.repeats))
    if args.ode_repeats:
        print_ode(bench, args.ode_repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
