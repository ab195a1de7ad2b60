"""DistributedDataParallel scaling of one training step (DSM on the VP-SDE, backward, Adam).

Run under torchrun, one process per device; the global batch is split across ranks as in training:

    torchrun --nproc_per_node=4 benchmarks/ddp_scaling.py --preset cifar10 --batch-size 128 --bf16

Rank 0 prints one JSON object: world size, seconds per step (median), images/s. ``benchmarks/gpu.py``
runs it for 1, 2, 4, … devices and prints the scaling table. On a CPU it runs with gloo (for checking).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

from sdeflow.core.distributed import init_from_env
from sdeflow.core.model import DiffusionModel
from sdeflow_builtin.losses import DSM
from sdeflow_builtin.networks import UNet
from sdeflow_builtin.parameterizations import Drift
from sdeflow_builtin.sdes import VPSDE
from sdeflow_builtin.time_samplers import Uniform

SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(SHAPES), default="cifar10")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch, split across ranks")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()

    ctx = init_from_env(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    device = ctx.device
    torch.manual_seed(0)
    shape = SHAPES[args.preset]
    net = UNet(shape, preset=args.preset).to(device)
    local = args.batch_size // ctx.world
    x = torch.randn(local, *shape, device=device)
    if args.channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    sde = VPSDE()
    model = DiffusionModel(sde, Drift(ctx.wrap(net), sde))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)
    loss_fn, time_sampler = DSM(), Uniform()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.bf16 and device.type == "cuda" else nullcontext()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(model, x, time_sampler).float().mean()
        loss.backward()
        optimizer.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ctx.barrier()

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    if ctx.is_main:
        print(json.dumps({"world": ctx.world, "preset": args.preset, "global_batch": local * ctx.world,
                          "seconds_per_step": seconds, "images_per_second": local * ctx.world / seconds,
                          "backend": dist.get_backend() if ctx.active else "none",
                          "bf16": bool(args.bf16 and device.type == "cuda")}))
    if ctx.active:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
