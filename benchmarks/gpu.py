"""The GPU benchmark in one command: the CIFAR-10 U-net training step in fp32, bf16, bf16 +
channels_last and bf16 + compile, then DDP scaling over 1, 2, 4, … GPUs.

    python benchmarks/gpu.py                      # CIFAR-10 preset, batch 128, every GPU present

Prints two tables: per variant, seconds per step, TFLOP/s and the fraction of this GPU's measured bf16
matmul rate; per world size, seconds per step, images/s and scaling efficiency. ``--device cpu`` runs
the same pipeline on a CPU (gloo) to check the script itself, not to measure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
VARIANTS = "eager,bf16,bf16_cl,bf16_compile"


def run_json(command: list[str]) -> list | dict:
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    start = min(i for i in (out.find("["), out.find("{")) if i >= 0)
    return json.loads(out[start:])


def variant_rows(args) -> list[dict]:
    variants = VARIANTS if args.device == "cuda" else "eager,channels_last"
    return run_json([sys.executable, str(HERE / "train_step.py"), "--preset", args.preset, "--batch-size",
                     str(args.batch_size), "--device", args.device, "--steps", str(args.steps),
                     "--variants", variants, "--json"])


def scaling_rows(args) -> list[dict]:
    available = torch.cuda.device_count() if args.device == "cuda" else 2
    worlds = [n for n in (1, 2, 4, 8, 16) if n <= min(available, args.max_devices)]
    rows = []
    for n in worlds:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                   str(HERE / "ddp_scaling.py"), "--preset", args.preset, "--batch-size", str(args.batch_size),
                   "--steps", str(args.steps)]
        if args.device == "cuda":
            command += ["--bf16", "--channels-last"]
        rows.append(run_json(command))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cifar10")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--max-devices", type=int, default=8)
    args = parser.parse_args()

    rows = variant_rows(args)
    gflop = rows[0]["gflop_per_step"]
    unit = "bf16" if args.device == "cuda" else "fp32"
    print(f"{args.preset} U-net, batch {args.batch_size}, {rows[0]['device']}: {gflop / 1e3:.2f} TFLOP per step; "
          f"measured {unit} matmul {rows[0]['matmul_gflops'] / 1e3:.1f} TFLOP/s")
    print(f"{'variant':<14}{'s/step':>9}{'TFLOP/s':>9}{'of matmul':>11}{'peak MB':>9}")
    for r in rows:
        print(f"{r['variant']:<14}{r['seconds_per_step']:>9.4f}{r['gflops'] / 1e3:>9.2f}"
              f"{r['fraction_of_matmul']:>11.1%}{r['peak_mem_mb']:>9.0f}")
    scaling = scaling_rows(args)
    print(f"\nDDP ({scaling[-1]['backend'] if scaling else '-'}), global batch {args.batch_size}:")
    print(f"{'devices':<9}{'s/step':>9}{'img/s':>9}{'TFLOP/s':>9}{'efficiency':>12}")
    for r in scaling:
        efficiency = r["images_per_second"] / (scaling[0]["images_per_second"] * r["world"])
        print(f"{r['world']:<9}{r['seconds_per_step']:>9.4f}{r['images_per_second']:>9.1f}"
              f"{gflop / r['seconds_per_step'] / 1e3:>9.2f}{efficiency:>12.1%}")


if __name__ == "__main__":
    main()
