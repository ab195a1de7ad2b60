"""Whether an evaluation's error bar can be trusted (MATH.md §16): bpd ± s.e. of a trained run under several
estimator settings, each with the tail diagnostic eval.json records (Pareto k̂ of the per-example values,
the top 1 %'s share of the excess over the median) and, over ``--repeats`` evaluations with other seeds,
how often ±2 s.e. covered a reference value (the ELBO with K = ``--reference-k`` stratified draws).

    python benchmarks/error_bars.py runs/swissroll [--repeats 10] [--reference-k 256]

Rows: the reference's protocol (elbo, uniform t, K = 1), elbo with uniform t at K = 8 and 64, the run's
own evaluation settings (for the shipped Swiss roll: combined_elbo, fitted, stratified, K = 4), and the ODE.
"""

from __future__ import annotations

import argparse
import sys

import attrs
import torch

from sdeflow.api import open_run
from sdeflow.evaluation.evaluate import evaluate


def run_row(run, label: str, estimator: str, cfg, time_sampler: str, seeds: list[int]) -> list[dict]:
    out = []
    for seed in seeds:
        ts = run.registry.get("time_sampler", time_sampler).factory()
        estimators = run.registry.get("estimator", estimator).factory(config=cfg, time_sampler=ts,
                                                                     samples=cfg.samples_per_example,
                                                                     time_sampler_name=time_sampler)
        result = evaluate(run.ema, run.data, {estimator: estimators}, batch_size=cfg.batch_size, seed=seed,
                          device=run.device, split="test", pilot_examples=cfg.pilot_examples,
                          space=run.ema_objective.space)[estimator]
        out.append({"label": label, **{k: result[k] for k in ("bpd", "bpd_se", "n")}, **result["tail"]})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a trained run folder")
    parser.add_argument("--repeats", type=int, default=10, help="evaluations with other seeds per row (default 10)")
    parser.add_argument("--reference-k", type=int, default=256, help="K of the reference value (default 256)")
    args = parser.parse_args(argv)
    run = open_run(args.run)._run
    run.ema.eval()
    own = run.exp.eval
    plain = attrs.evolve(own, estimator="elbo", time_proposal="sampler", stratify_time=False, samples_per_example=1)
    rows = [("elbo, uniform t, K=1 (the reference code)", "elbo", plain, "uniform"),
            ("elbo, uniform t, K=8", "elbo", attrs.evolve(plain, samples_per_example=8), "uniform"),
            ("elbo, uniform t, K=64", "elbo", attrs.evolve(plain, samples_per_example=64), "uniform"),
            (f"the run's own ({own.estimator}, {own.time_proposal}, K={own.samples_per_example})", own.estimator,
             own, own.time_sampler),
            ("ode", "ode", own, own.time_sampler)]
    reference_cfg = attrs.evolve(plain, samples_per_example=args.reference_k, stratify_time=True)
    reference = run_row(run, "reference", "elbo", reference_cfg, "debiased", [12345])[0]
    print(f"reference: elbo, debiased t, stratified, K={args.reference_k}: {reference['bpd']:.4f} "
          f"± {reference['bpd_se']:.4f} (n={reference['n']})")
    print(f"{'settings':<52} {'bpd':>8} {'s.e.':>7} {'k_hat':>6} {'top1%':>6} {'trusted':>8} {'median bpd':>10} "
          f"{'covered':>8}")
    for label, estimator, cfg, ts in rows:
        repeats = 1 if estimator == "ode" else args.repeats
        results = run_row(run, label, estimator, cfg, ts, list(range(repeats)))
        first = results[0]
        covered = sum(abs(r["bpd"] - reference["bpd"]) <= 2 * r["bpd_se"] for r in results)
        median = float(torch.tensor([r["bpd"] for r in results]).median())
        k = "-" if first["pareto_k"] is None else f"{first['pareto_k']:.2f}"
        print(f"{label:<52} {first['bpd']:>8.4f} {first['bpd_se']:>7.4f} {k:>6} {100 * first['top1pct_share']:>5.1f}% "
              f"{str(first['se_trusted']):>8} {median:>10.4f} {covered:>4}/{len(results):<3}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
