"""Sample quality against network evaluations (NFE) for every built-in sampler, on a trained run.

    sdeflow train experiments/swissroll.yaml          # the default run, if not there yet
    python benchmarks/sampling.py runs/swissroll      # prints the table and the NFE each sampler needs

Quality on vector data is the sliced Wasserstein distance (sdeflow.evaluation.quality, 512 directions) between
``--num`` samples and the test split, beside its floor (val against test: what the data itself scores at
that size). On image data it is FID (sdeflow.evaluation.quality.inception_quality: Inception-v3 features against the
cached statistics of the training images; floor: ``--num`` test images), on a shorter grid, since each
setting runs ``--num`` images through Inception (about 7 images/s on 2 CPU cores):

    python benchmarks/elbo_variance.py --write-blob-mnist blob --n-train 2048 --n-test 512
    sdeflow train experiments/mnist.yaml --run-dir runs/blob device=cpu data.root=blob data.download=false \
        data.n_val=128 network.ch=16 'network.ch_mult=[1,2]' network.num_res_blocks=1 \
        'network.attn_resolutions=[]' network.num_groups=8 train.steps=3000 train.lr=2e-3 train.ema=0.999 \
        train.num_workers=0 eval.max_examples=64 eval.samples_per_example=1     # about 9 minutes
    python benchmarks/sampling.py runs/blob --num 500 --seeds 1                 # about 50 minutes

The reference is Euler–Maruyama λ = 0 (the reverse SDE) at 1000 steps; the summary gives, for each
sampler, the fewest NFE at which it is at least as good, and that as a fraction of the reference's.
"""

from __future__ import annotations

import argparse

import torch

import sdeflow
from sdeflow.core.batches import take
from sdeflow.evaluation.quality import inception_quality, sliced_wasserstein

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
IMAGE_SETTINGS = [  # FID costs an Inception pass per setting: fewer points
    ("euler_maruyama", {"lam": 0.0}, [100, 200, 1000]),
    ("euler_maruyama", {"lam": 1.0}, [100]),
    ("heun", {"grid": "karras"}, [10, 20, 50]),
    ("dpm_solver", {"order": 2}, [10, 20, 50]),
    ("dpm_solver", {"order": 3}, [10, 20]),
]
IMAGE_ODE_TOLERANCES = [1e-3]


def swd(run, sampler, num: int, steps: int | None, seed: int, test: torch.Tensor) -> tuple[float, int]:
    x, _ = run.built.draw(sampler, num, steps=steps, seed=seed)
    value = sliced_wasserstein(x, test[:num], generator=torch.Generator().manual_seed(seed))
    return value, int(sampler.nfe)


def fid(run, sampler, num: int, steps: int | None, seed: int) -> tuple[float, float, int]:
    """(FID, its floor, the NFE of the last batch)."""
    q = inception_quality(run.built, ["fid"], sampler, steps=steps, split="test", n=num, seed=seed)["fid"]
    return q["value"], q["floor"], int(sampler.nfe)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", default="runs/swissroll")
    parser.add_argument("--num", type=int, default=2000, help="samples per setting (and test examples)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds averaged per setting")
    args = parser.parse_args()
    run = sdeflow.open_run(args.run_dir)
    images = run.data.kind == "image"
    if images:
        metric, settings, tolerances = "FID", IMAGE_SETTINGS, IMAGE_ODE_TOLERANCES
        floor = None
    else:
        metric, settings, tolerances = "SWD", SETTINGS, ODE_TOLERANCES
        test = run.examples("test", args.num)
        val = take(run.data.val, range(min(args.num, len(run.data.val))))
        floor = sliced_wasserstein(val, test, generator=torch.Generator().manual_seed(0))
    rows = []
    settings = [*settings, *[("ode", {"rtol": tol, "atol": tol}, [None]) for tol in tolerances]]
    for name, kwargs, steps_list in settings:
        for steps in steps_list:
            sampler = sdeflow.component("sampler", name, **kwargs)
            if images:
                runs = [fid(run, sampler, args.num, steps, seed) for seed in range(args.seeds)]
                floor = runs[0][1]
                runs = [(r[0], r[2]) for r in runs]
            else:
                runs = [swd(run, sampler, args.num, steps, seed, test) for seed in range(args.seeds)]
            value = sum(r[0] for r in runs) / len(runs)
            nfe = round(sum(r[1] for r in runs) / len(runs))
            label = ", ".join(f"{k}={v}" for k, v in kwargs.items())
            rows.append((f"{name} ({label})", steps, nfe, value))
            print(f"{name:>15} {label:<22} steps {str(steps):>5}  NFE {nfe:>5}  {metric} {value:.4f}  "
                  f"({value / floor:.2f}× floor)", flush=True)
    reference = next(r for r in rows if r[0].startswith("euler_maruyama (lam=0.0)") and r[1] == 1000)
    against = "test vs the training images" if images else "val vs test"
    print(f"\n{run.path}: {args.num} samples, {args.seeds} seeds; floor ({against}) {metric} {floor:.4f}")
    print(f"reference: Euler–Maruyama λ = 0, 1000 steps: {metric} {reference[3]:.4f} at {reference[2]} NFE\n")
    print(f"| sampler | fewest NFE with {metric} ≤ the reference | steps | {metric} | NFE / reference NFE |")
    print("|---|---|---|---|---|")
    for label in dict.fromkeys(r[0] for r in rows):
        good = [r for r in rows if r[0] == label and r[3] <= reference[3]]
        if good:
            best = min(good, key=lambda r: r[2])
            print(f"| {label} | {best[2]} | {best[1]} | {best[3]:.4f} | {best[2] / reference[2]:.3f} |")
        else:
            closest = min((r for r in rows if r[0] == label), key=lambda r: r[3])
            print(f"| {label} | not reached (best {metric} {closest[3]:.4f} at {closest[2]} NFE) | | | |")


if __name__ == "__main__":
    main()
