"""Wall time of a sweep under the `sequential` and `local` launchers, and the steps a preemption costs.

    python benchmarks/sweep_launchers.py                                  # swissroll_components, --jobs 2
    python benchmarks/sweep_launchers.py --override train.steps=200       # a quick look
    python benchmarks/sweep_launchers.py --preemption-only

Prints a table: the wall time of each launcher, the summed time of its variants (from their
metrics), whether the two summaries give the same numbers, and what one variant per device on N GPUs
would take by the same arithmetic (⌈V / N⌉ rounds of the slowest variant). The preemption part trains
the Swiss roll with a far-off `checkpoint_every` and a short `checkpoint_minutes`, stops it once with
SIGTERM (a preemption with notice: the step in hand is saved) and once with SIGKILL (no notice: what
was trained since the last timed checkpoint is lost), and reports the steps lost each time.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SDEFLOW = [sys.executable, "-m", "sdeflow"]


def sweep(experiment: Path, runs_dir: Path, launcher: str, jobs: int, overrides: list[str]) -> float:
    """Seconds of one `sdeflow sweep` with the given launcher."""
    argv = [*SDEFLOW, "sweep", str(experiment), "--runs-dir", str(runs_dir), "--launcher", launcher,
            "--jobs", str(jobs), *overrides]
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def summary(runs_dir: Path) -> list[dict[str, str]]:
    with open(runs_dir / "summary.csv") as f:
        return list(csv.DictReader(f))


def numbers(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    """The bpd and delta columns by variant: what a launcher must not change."""
    return {row["variant"]: {k: v for k, v in row.items() if "bpd" in k or "delta" in k} for row in rows}


def launchers_table(args) -> None:
    rows, results = [], {}
    for launcher, jobs in (("sequential", 1), ("local", args.jobs)):
        runs_dir = args.out / launcher
        wall = sweep(args.experiment, runs_dir, launcher, jobs, args.override)
        table = summary(runs_dir)
        per_variant = [float(row["wall_s"]) for row in table if row["wall_s"]]
        results[launcher] = numbers(table)
        rows.append((f"{launcher} (--jobs {jobs})", len(table), wall, sum(per_variant),
                     max(per_variant, default=float("nan"))))
    print(f"\n{args.experiment.name} on {os.cpu_count()} CPU cores {' '.join(args.override)}")
    print("| launcher | variants | wall s | Σ variant train s | slowest variant s |")
    print("|---|---|---|---|---|")
    for name, v, wall, total, slowest in rows:
        print(f"| {name} | {v} | {wall:.0f} | {total:.0f} | {slowest:.0f} |")
    print(f"speed-up local/sequential: {rows[0][2] / rows[1][2]:.2f}×; "
          f"summaries identical: {results['sequential'] == results['local']}")
    v, sequential = rows[0][1], rows[0][2]
    per = sequential / v
    print(f"one variant per device, by the same arithmetic (⌈{v}/N⌉ × {per:.0f} s per variant, sequential):")
    print(" ".join(f"N={n}: {math.ceil(v / n) * per:.0f} s;" for n in (1, 2, 4, 8, 12)))


def preempt(run_dir: Path, how: int, after: float, checkpoint_minutes: float) -> tuple[int, int, int]:
    """(exit status, last step logged before the stop, step the run resumes from)."""
    argv = [*SDEFLOW, "train", str(ROOT / "experiments/swissroll.yaml"), "--run-dir", str(run_dir),
            "train.steps=1000000", "train.checkpoint_every=1000000", "train.log_every=1",
            "train.eval_every=1000000", f"train.checkpoint_minutes={checkpoint_minutes}",
            "logging.progress=false", "logging.tensorboard=false"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(after)
    process.send_signal(how)
    _, err = process.communicate()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    reached = max(json.loads(line).get("step", 0) for line in lines if line.startswith("{"))
    import torch  # only here: the launcher part needs none of it
    last = run_dir / "checkpoints/last.pt"
    saved = torch.load(last, map_location="cpu", weights_only=True)["step"] if last.exists() else 0
    return process.returncode, reached, saved


def preemption_table(args) -> None:
    minutes = args.checkpoint_minutes
    print(f"\npreemption of swissroll.yaml after {args.after:.0f} s, train.checkpoint_minutes={minutes}")
    print("| signal | exit status | last step trained | checkpoint step | steps lost |")
    print("|---|---|---|---|---|")
    for how in (signal.SIGTERM, signal.SIGUSR1, signal.SIGKILL):
        with tempfile.TemporaryDirectory(dir=args.out) as tmp:
            status, reached, saved = preempt(Path(tmp) / "run", how, args.after, minutes)
        print(f"| {signal.Signals(how).name} | {status} | {reached} | {saved} | {reached - saved} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", type=Path,
                        default=ROOT / "experiments/ablations/swissroll_components.yaml")
    parser.add_argument("--jobs", type=int, default=2, help="variants at once for the local launcher")
    parser.add_argument("--override", action="append", default=[], help="key=value for every variant")
    parser.add_argument("--out", type=Path, default=None, help="folder for the runs (default: a temp dir)")
    parser.add_argument("--after", type=float, default=20.0, help="seconds of training before the signal")
    parser.add_argument("--checkpoint-minutes", type=float, default=0.1)
    parser.add_argument("--preemption-only", action="store_true")
    parser.add_argument("--launchers-only", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        args.out = args.out or Path(tmp)
        args.out.mkdir(parents=True, exist_ok=True)
        if not args.preemption_only:
            launchers_table(args)
        if not args.launchers_only:
            preemption_table(args)


if __name__ == "__main__":
    main()
