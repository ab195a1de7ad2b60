"""Time one full training step of the image U-net: DSM loss on the VP-SDE, backward, Adam.

    python benchmarks/train_step.py --preset mnist --batch-size 64
    python benchmarks/train_step.py --preset cifar10 --device cuda --variants eager,compile,bf16 --json

Prints, per variant, the median seconds per step (after warm-up), images/s, GFLOP per step (counted
with FlopCounterMode over one eager step), the achieved GFLOP/s, this machine's measured matmul rate
(bf16 on GPU; on CPU fp32, or bf16 for a bf16 variant) and the fraction of it reached, and the peak
memory. Each variant runs in a fresh process, so compile caches, allocator state and peak memory do
not leak between variants.

Variants: ``eager``; ``channels_last`` (weights and data in NHWC; on the CPU GroupNorm+SiLU then run
as sdeflow's fused kernel); ``compile`` (``torch.compile`` of the network, NCHW); ``compile_cl``
(both; the compiled graph uses PyTorch's GroupNorm); ``bf16`` (autocast), ``bf16_cl``, ``bf16_compile``
and ``bf16_compile_cl``. A ``_cl`` suffix always means channels_last. The bf16 variants run by default
on GPU only; on a CPU with bf16 matrix units (AMX) name them with ``--variants``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import sys
import time
from contextlib import nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode

from sdeflow.core.model import DiffusionModel
from sdeflow.training.allocator import keep_freed_memory
from sdeflow.training.trainer import adam
from sdeflow_builtin.losses import DSM
from sdeflow_builtin.networks import PRESETS, UNet
from sdeflow_builtin.parameterizations import Drift
from sdeflow_builtin.sdes import VPSDE
from sdeflow_builtin.time_samplers import Uniform

DATA_SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
VARIANTS = ("eager", "channels_last", "compile", "compile_cl", "bf16", "bf16_cl", "bf16_compile",
            "bf16_compile_cl")
BF16 = {v for v in VARIANTS if v.startswith("bf16")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="mnist")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median is reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile happens here)")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated subset of {','.join(VARIANTS)} (default: all that apply)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the CPU")
    parser.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    parser.add_argument("--plain-malloc", action="store_true",
                        help="leave glibc's malloc thresholds alone (the command line raises them)")
    return parser.parse_args(argv)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available")
    return torch.device(name)


def chosen_variants(spec: str | None, device: torch.device) -> list[str]:
    if spec is None:
        return [v for v in VARIANTS if device.type == "cuda" or v not in BF16]
    variants = [v.strip() for v in spec.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    return variants


def matmul_dtype(device: torch.device, variant: str) -> torch.dtype:
    """The precision a variant's rate is measured against: bf16 on GPU (as the targets are stated)."""
    return torch.bfloat16 if device.type == "cuda" or variant in BF16 else torch.float32


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_gflops(device: torch.device, dtype: torch.dtype, repeats: int = 10) -> float:
    """The machine's dense matmul rate in ``dtype`` (median of ``repeats``)."""
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def build(preset: str, batch: int, device: torch.device, variant: str):
    """The network, a one-step closure and the data, for one variant."""
    torch.manual_seed(0)
    shape = DATA_SHAPES[preset]
    net = UNet(shape, preset=preset).to(device)
    x = torch.randn(batch, *shape, device=device)
    if variant == "channels_last" or variant.endswith("_cl"):
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    sde = VPSDE()
    network = torch.compile(net) if "compile" in variant else net
    model = DiffusionModel(sde, Drift(network, sde))
    optimizer = adam(net.parameters(), 1e-4)  # the trainer's
    loss_fn, time_sampler = DSM(), Uniform()
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if variant.startswith("bf16") else nullcontext()
    )

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(model, x, time_sampler).mean()
        loss.backward()
        optimizer.step()

    return net, step


def count_gflop(step) -> float:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / 1e9


def time_steps(step, device: torch.device, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    synchronize(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # Linux reports ru_maxrss in KiB: the whole process's peak resident set (weights, Python, libs).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_variant(args: argparse.Namespace, variant: str, matmul: float) -> dict:
    """Measure one variant (called in a fresh process)."""
    if not args.plain_malloc:
        keep_freed_memory()  # as the command line does
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    net, step = build(args.preset, args.batch_size, device, variant)
    times = time_steps(step, device, args.warmup, args.steps)
    seconds, peak_mb = statistics.median(times), peak_memory_mb(device)  # before the FLOP count's twin
    # Count on an eager twin: the compiled graph does the same arithmetic, and FlopCounterMode
    # cannot see inside compiled kernels.
    plain = "bf16" if variant.startswith("bf16") else "eager"
    gflop = count_gflop(build(args.preset, args.batch_size, device, plain)[1])
    return {
        "preset": args.preset,
        "batch_size": args.batch_size,
        "variant": variant,
        "device": str(device),
        "parameters": sum(p.numel() for p in net.parameters()),
        "seconds_per_step": seconds,
        "fastest_step_seconds": min(times),  # on a shared machine, the least disturbed step
        "images_per_second": args.batch_size / seconds,
        "gflop_per_step": gflop,
        "gflops": gflop / seconds,
        "matmul_gflops": matmul,
        "fraction_of_matmul": gflop / seconds / matmul,
        "peak_mem_mb": peak_mb,
    }


def _matmul_in_child(args: argparse.Namespace, dtype: torch.dtype) -> float:
    if args.threads:
        torch.set_num_threads(args.threads)
    return matmul_gflops(resolve_device(args.device), dtype)


def print_table(rows: list[dict]) -> None:
    header = (f"{'variant':<14}{'s/step':>9}{'fastest':>9}{'img/s':>9}{'GFLOP/step':>12}{'GFLOP/s':>10}"
              f"{'matmul':>14}{'fraction':>10}{'peak MB':>10}")
    print(f"preset={rows[0]['preset']} batch={rows[0]['batch_size']} device={rows[0]['device']} "
          f"parameters={rows[0]['parameters']:,}")
    print(header)
    for r in rows:
        print(f"{r['variant']:<14}{r['seconds_per_step']:>9.3f}{r['fastest_step_seconds']:>9.3f}"
              f"{r['images_per_second']:>9.1f}"
              f"{r['gflop_per_step']:>12.1f}{r['gflops']:>10.1f}{r['matmul_gflops']:>9.0f} {r['matmul_dtype']:<4}"
              f"{r['fraction_of_matmul']:>10.1%}{r['peak_mem_mb']:>10.0f}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
        sys.exit("--steps and --batch-size must be positive and --warmup non-negative")
    device = resolve_device(args.device)
    variants = chosen_variants(args.variants, device)
    context = multiprocessing.get_context("spawn")  # CUDA and fresh peak-memory counters need spawn
    rows = []
    with context.Pool(1, maxtasksperchild=1) as pool:
        dtypes = {v: matmul_dtype(device, v) for v in variants}
        matmul = {dtype: pool.apply(_matmul_in_child, (args, dtype)) for dtype in set(dtypes.values())}
        for variant in variants:
            rows.append(pool.apply(run_variant, (args, variant, matmul[dtypes[variant]])))
            rows[-1]["matmul_dtype"] = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtypes[variant]]
    if args.json:
        print(json.dumps(rows, indent=1))
    elif rows:
        print_table(rows)


if __name__ == "__main__":
    main()
