"""``sdeflow sample RUN_DIR``: draw from a trained run's EMA model into a PNG (grid or scatter plot).

With ``--trajectories`` (2-D data only) it also draws the sampler's paths for λ = 0 (reverse SDE)
and λ = 1 (probability-flow ODE) side by side, the paper's Figure 5.
"""

from __future__ import annotations

from pathlib import Path

from .build import require_lambda_sampler
from .errors import SdeflowError
from .memory import bytes_per_example, check_batch_fits
from .runs import open_run


def trajectories_path(run_dir: Path, out: str | None) -> Path:
    """RUN_DIR/samples/trajectories.png, or ``<out stem>_trajectories.png`` beside ``--out``."""
    if out is None:
        return run_dir / "samples" / "trajectories.png"
    out_path = Path(out)
    return out_path.with_name(f"{out_path.stem}_trajectories.png")


def sample_from_cli(args) -> int:
    run = open_run(args.run_dir)
    if args.trajectories and not run.data.planar:
        raise SdeflowError(f"--trajectories: needs 2-D data; {run.run_dir} holds {run.data.kind} data "
                           f"of shape {tuple(run.data.shape)}")
    if args.trajectories:
        require_lambda_sampler(run.registry, run.exp, "--trajectories")
    cfg = run.exp.sample
    num = args.num if args.num is not None else cfg.num
    steps = args.steps if args.steps is not None else cfg.steps
    lam = args.lam if args.lam is not None else cfg.lam
    per_example = bytes_per_example(run.ema, tuple(run.data.shape), run.device)
    check_batch_fits("--num", num, per_example, run.device, str(run.run_dir), factor=1.5)
    out = Path(args.out) if args.out else run.run_dir / "samples" / "sample.png"
    print(run.save_samples(out, num=num, lam=lam, steps=steps, seed=args.seed))
    if args.trajectories:
        path = trajectories_path(run.run_dir, args.out)
        print(run.save_trajectories(path, num=num, steps=steps, seed=args.seed))
    return 0
