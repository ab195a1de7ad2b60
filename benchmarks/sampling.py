"""Sample quality against network evaluations (NFE) for every built-in sampler, on a trained run.

    sdeflow train experiments/swissroll.yaml          # the default run, if not there yet
    python benchmarks/sampling.py runs/swissroll      # prints the table and the NFE each sampler needs

Quality is the sliced Wasserstein distance (sdeflow.quality, 512 directions) between ``--num`` samples
and the test split, beside its floor (val against test: what the data itself scores at that size).
The reference is Euler–Maruyama λ = 0 (the reverse SDE) at 1000 steps; the summary gives, for each
sampler, the fewest NFE at which it is at least as good, and that as a fraction of the reference's.
"""

from __future__ import annotations

import argparse

import torch

import sdeflow
from sdeflow.data import take
from sdeflow.quality import sliced_wasserstein

SETTINGS = [  # (sampler, constructor arguments, steps to try)
    ("euler_maruyama", {"lam": 0.0}, [20, 50, 100, 200, 500, 1000]),
    ("euler_maruyama", {"lam": 1.0}, [10, 20, 50, 100, 200, 500, 1000]),
    ("pc", {"lam": 0.0}, [20, 50, 100, 200, 500]),
    ("heun", {"grid": "karras"}, [5, 10, 20, 50, 100]),
    ("heun", {"grid": "log_snr"}, [5, 10, 20, 50, 100]),
    ("dpm_solver", {"order": 2}, [5, 10, 20, 50, 100]),
    ("dpm_solver", {"order": 3}, [5, 10, 20, 50, 100]),
]
ODE_TOLERANCES = [1e-2, 1e-3, 1e-4, 1e-5]


def quality(run, sampler, num: int, steps: int | None, seed: int, test: torch.Tensor) -> tuple[float, int]:
    x, _ = run.built.draw(sampler, num, steps=steps, seed=seed)
    swd = sliced_wasserstein(x, test[:num], generator=torch.Generator().manual_seed(seed))
    return swd, int(sampler.nfe)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", default="runs/swissroll")
    parser.add_argument("--num", type=int, default=2000, help="samples per setting (and test examples)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds averaged per setting")
    args = parser.parse_args()
    run = sdeflow.open_run(args.run_dir)
    test = run.examples("test", args.num)
    val = take(run.data.val, range(min(args.num, len(run.data.val))))
    floor = sliced_wasserstein(val, test, generator=torch.Generator().manual_seed(0))
    rows = []
    settings = [*SETTINGS, *[("ode", {"rtol": tol, "atol": tol}, [None]) for tol in ODE_TOLERANCES]]
    for name, kwargs, steps_list in settings:
        for steps in steps_list:
            sampler = sdeflow.component("sampler", name, **kwargs)
            runs = [quality(run, sampler, args.num, steps, seed, test) for seed in range(args.seeds)]
            swd = sum(r[0] for r in runs) / len(runs)
            nfe = round(sum(r[1] for r in runs) / len(runs))
            label = ", ".join(f"{k}={v}" for k, v in kwargs.items())
            rows.append((f"{name} ({label})", steps, nfe, swd))
            print(f"{name:>15} {label:<22} steps {str(steps):>5}  NFE {nfe:>5}  SWD {swd:.4f}  "
                  f"({swd / floor:.2f}× floor)", flush=True)
    reference = next(r for r in rows if r[0].startswith("euler_maruyama (lam=0.0)") and r[1] == 1000)
    print(f"\n{run.path}: {args.num} samples, {args.seeds} seeds; floor (val vs test) SWD {floor:.4f}")
    print(f"reference: Euler–Maruyama λ = 0, 1000 steps: SWD {reference[3]:.4f} at {reference[2]} NFE\n")
    print("| sampler | fewest NFE with SWD ≤ the reference | steps | SWD | NFE / reference NFE |")
    print("|---|---|---|---|---|")
    for label in dict.fromkeys(r[0] for r in rows):
        good = [r for r in rows if r[0] == label and r[3] <= reference[3]]
        if good:
            best = min(good, key=lambda r: r[2])
            print(f"| {label} | {best[2]} | {best[1]} | {best[3]:.4f} | {best[2] / reference[2]:.3f} |")
        else:
            closest = min((r for r in rows if r[0] == label), key=lambda r: r[3])
            print(f"| {label} | not reached (best SWD {closest[3]:.4f} at {closest[2]} NFE) | | | |")


if __name__ == "__main__":
    main()
