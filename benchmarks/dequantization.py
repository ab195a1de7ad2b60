"""Bits per dimension under each dequantizer at equal training steps, with the paired s.e. of each
difference, and what each dequantizer costs a training step (MATH.md §14).

    python benchmarks/dequantization.py                       # tiny MNIST-format files of random pixels
    python benchmarks/dequantization.py --data blob --steps 400 --examples 512

``--data ROOT`` is any folder holding MNIST's IDX files (blob-MNIST: ``python benchmarks/elbo_variance.py
--write-blob-mnist blob``); without it the script writes tiny files of random pixels, as the tests do.
One model per dequantizer (``uniform``, ``truncated_normal``, ``variational``) is trained by
``sdeflow sweep`` with the ELBO loss (which the variational one needs) and the same seed, so every
variant is evaluated on the same test examples with the same draws; then the uniform model is also
evaluated under ``truncated_normal`` (a swap at evaluation time). Prints a markdown table: test bpd ± s.e.,
the difference to ``uniform`` ± its paired s.e., and milliseconds per training step.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

VARIANTS = {"uniform": {}, "truncated_normal": {"dequantizer.name": "truncated_normal"},
            "variational": {"dequantizer.name": "variational"}}


def experiment(root: str, steps: int, examples: int, batch: int) -> dict:
    return {
        "name": "dequantization", "seed": 0, "device": "auto",
        "data": {"name": "mnist", "root": root, "download": False, "logit_alpha": 0.05, "n_val": 16},
        "network": {"name": "unet", "ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [],
                    "num_groups": 8},
        "loss": {"name": "elbo"},
        "dequantizer": {"name": "uniform"},
        "sampler": {"name": "euler_maruyama", "steps": 10},
        "train": {"steps": steps, "batch_size": batch, "lr": 2.0e-3, "log_every": max(1, steps // 4),
                  "checkpoint_every": steps, "eval_every": 0, "sample_every": 0},
        "eval": {"batch_size": 128, "max_examples": examples, "samples_per_example": 4, "time_sampler": "debiased",
                 "stratify_time": True},
        "sample": {"num": 4},
        "logging": {"progress": False, "tensorboard": False},
        "ablations": [{"name": name, "set": changes} for name, changes in VARIANTS.items() if changes],
    }


def sdeflow(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "sdeflow", *args], check=True)


def test_entry(run_dir: Path, dequantizer: str | None = None) -> dict:
    data = json.loads((run_dir / "eval.json").read_text())
    if dequantizer is None:
        return data["test"]["elbo"]
    (entry,) = [e for e in data["results"].values() if e["split"] == "test" and e["estimator"] == "elbo"
                and e["protocol"].get("dequantizer", {}).get("name") == dequantizer and not e["full"]]
    return entry


def per_example(run_dir: Path, entry: dict) -> list[float]:
    rows = (run_dir / entry["per_example"]).read_text().splitlines()[1:]
    return [float(r.split(",")[2]) for r in rows]


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(d) / len(d)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in d) / (len(d) - 1) / len(d))


def ms_per_step(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    return 1000 * records[-1]["elapsed_s"] / records[-1]["step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="folder with MNIST's IDX files (default: tiny random files)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--examples", type=int, default=64, help="test examples evaluated")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--runs-dir", help="where the sweep's run folders go (default: a temporary folder)")
    args = parser.parse_args()
    work = Path(args.runs_dir or tempfile.mkdtemp(prefix="dequantization-"))
    work.mkdir(parents=True, exist_ok=True)
    root = args.data
    if root is None:
        from fakedata import write_mnist

        root = str(work / "tiny")
        write_mnist(root, n_train=256, n_test=args.examples, seed=0)
    path = work / "dequantization.yaml"
    path.write_text(yaml.safe_dump(experiment(str(Path(root).resolve()), args.steps, args.examples,
                                              args.batch_size), sort_keys=False))
    runs = work / "runs"
    sdeflow("sweep", str(path), "--runs-dir", str(runs))
    sdeflow("eval", str(runs / "base"), "--dequantizer", "truncated_normal")
    folders = {"uniform": runs / "base", "truncated_normal": runs / "truncated_normal",
               "variational": runs / "variational"}
    base = per_example(folders["uniform"], test_entry(folders["uniform"]))
    print(f"\n{args.steps} steps, batch {args.batch_size}, {len(base)} test examples ({root})\n")
    print("| trained with | evaluated with | test bpd (s.e.) | Δ vs uniform (paired s.e.) | ms / step |")
    print("|---|---|---|---|---|")
    rows = [(name, name, folder, None) for name, folder in folders.items()]
    rows.append(("uniform", "truncated_normal", folders["uniform"], "truncated_normal"))
    for trained, evaluated, folder, swap in rows:
        entry = test_entry(folder, swap)
        delta, se = paired(per_example(folder, entry), base)
        diff = "" if (trained, evaluated) == ("uniform", "uniform") else f"{delta:+.4f} ({se:.4f})"
        print(f"| {trained} | {evaluated} | {entry['bpd']:.4f} ({entry['bpd_se']:.4f}) | {diff} | "
              f"{ms_per_step(folder):.0f} |")


if __name__ == "__main__":
    main()
