"""Network evaluations the probability-flow ODE likelihood needs for a given accuracy (MATH.md §7), by the
variable the solver steps in (``eval.ode_time``: t, log t, log-SNR) and its tolerance.

    python benchmarks/ode_nfe.py RUN_DIR [RUN_DIR ...] [--n 64] [--bound truncated]

For each trained run: the first ``--n`` test examples (one dequantization draw, one Rademacher probe per
example, the same for every row; the exact divergence for data of ≤ 8 dimensions), and

- the reference: dopri5 in t at rtol = atol = 1e-7;
- score_sde's protocol: RK45 (dopri5) in t at rtol = atol = 1e-5 (from t₀ = 1e-5 under the paper's bound);
- dopri5 in t, log t and log-SNR at tolerances 1e-2 … 1e-5;

each row with its NFE per solve and |Δbpd| (the mean over the examples) to the reference, and per variable
the fewest NFE that reach |Δbpd| < 0.002 at that tolerance and every tighter one. Under a bound from t_ε
(``--bound`` or the run's own) every solve starts at t_ε instead (MATH.md §15).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import attrs
import torch

from sdeflow.api import open_run
from sdeflow.core.batches import take
from sdeflow.core.transforms import bits_per_dim
from sdeflow.likelihood.ode import ODEEstimator

TARGET = 0.002
TOLERANCES = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5)


def bpd_of(run, estimator: ODEEstimator, z, log_det, log_q) -> tuple[torch.Tensor, int]:
    """Per-example bpd of one solve of every example at once, and its NFE (the probe from a fixed stream)."""
    estimator.nfe.clear()
    with torch.no_grad():
        logp = estimator(run.ema, z, torch.Generator(device=z.device).manual_seed(0)).double()
    dim = math.prod(run.data.shape)
    space = run.ema_objective.space
    return bits_per_dim(logp, log_det, dim, space.bits_offset, log_q), estimator.nfe[-1]


def measure(run_dir: str, n: int, bound: str | None) -> list[dict]:
    api = open_run(run_dir)
    run = api._run
    if bound is not None and bound != run.exp.bound:
        from sdeflow.assembly.build import build_bound

        run.ema.bound = build_bound(attrs.evolve(run.exp, bound=bound), run.data)
    run.ema.eval()
    x = take(run.data.test, range(min(n, len(run.data.test)))).to(run.device)
    z, log_det, log_q = run.ema_objective.space(x, generator=torch.Generator(device=run.device).manual_seed(1))
    probe = "exact" if math.prod(run.data.shape) <= 8 else "rademacher"
    t0 = 1e-5

    def solve(time_variable: str, tol: float) -> tuple[float, int, float, float]:
        estimator = ODEEstimator(probe, t0, "dopri5", tol, tol, time_variable)
        start = time.perf_counter()
        bpd, nfe = bpd_of(run, estimator, z, log_det, log_q)
        return float(bpd.mean()), nfe, time.perf_counter() - start, bpd

    ref_mean, ref_nfe, ref_s, ref_bpd = solve("t", 1e-7)
    rows = [{"run": run_dir, "variable": "t", "tol": 1e-7, "nfe": ref_nfe, "bpd": ref_mean, "err": 0.0,
             "max_err": 0.0, "s": ref_s, "note": "reference"}]
    for variable in ("t", "log_t", "log_snr"):
        for tol in TOLERANCES:
            mean, nfe, seconds, bpd = solve(variable, tol)
            note = "score_sde (RK45 in t, 1e-5)" if (variable, tol) == ("t", 1e-5) else ""
            rows.append({"run": run_dir, "variable": variable, "tol": tol, "nfe": nfe, "bpd": mean,
                         "err": abs(mean - ref_mean), "max_err": float((bpd - ref_bpd).abs().max()),
                         "s": seconds, "note": note})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="trained run folders")
    parser.add_argument("--n", type=int, default=64, help="test examples (default 64)")
    parser.add_argument("--bound", choices=["paper", "discrete", "truncated"], help="evaluate under this bound")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"{'run':<28} {'variable':<8} {'tol':>7} {'NFE':>5} {'bpd':>9} {'|Δbpd|':>9} {'max|Δ|':>8} {'s':>6}  note")
    for run_dir in args.runs:
        rows = measure(run_dir, args.n, args.bound)
        for r in rows:
            print(f"{r['run'][-28:]:<28} {r['variable']:<8} {r['tol']:>7.0e} {r['nfe']:>5} {r['bpd']:>9.4f} "
                  f"{r['err']:>9.5f} {r['max_err']:>8.4f} {r['s']:>6.1f}  {r['note']}")
        protocol = next(r for r in rows if r["note"].startswith("score_sde"))
        print(f"score_sde's protocol: {protocol['nfe']} NFE, |Δbpd| = {protocol['err']:.5f}")
        for variable in ("t", "log_t", "log_snr"):
            tried = [r for r in rows[1:] if r["variable"] == variable]  # loosest tolerance first
            # the loosest tolerance from which on every tighter one meets the target (errors of a mean over
            # examples partly cancel, so one lucky loose tolerance is not enough)
            good = [r for i, r in enumerate(tried) if all(later["err"] < TARGET for later in tried[i:])]
            best = min(good, key=lambda r: r["nfe"]) if good else None
            if best:
                ratio = best["nfe"] / protocol["nfe"]
                print(f"  {variable:<8} fewest NFE with |Δbpd| < {TARGET}: {best['nfe']} (tol {best['tol']:.0e}), "
                      f"{ratio:.2f}x score_sde's")
            else:
                print(f"  {variable:<8} no tolerance tried reaches |Δbpd| < {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
