"""Will a batch fit? A rough, conservative-on-the-large-side estimate made before anything is allocated.

The network is run once on two examples under hooks that add up the size of every leaf module's output
(the activations a backward pass keeps); a batch of B examples needs about B/2 times that, times a
factor for gradients and temporaries. Only sizes far beyond the memory of the device are refused:
the point is a one-line error instead of an allocator traceback, not a tight bound.
"""

from __future__ import annotations

import math
import os

import torch

from ..core.errors import ConfigError

FACTOR = 3.0
"""Activations kept for backward, their gradients, and temporaries (a training step or an ELBO)."""


def available_bytes(device: torch.device) -> int | None:
    """Free memory of the device (CUDA: free device memory; CPU: MemAvailable), None if unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@torch.no_grad()
def bytes_per_example(model, shape: tuple[int, ...], device: torch.device) -> int:
    """Bytes of leaf-module outputs per example for one evaluation of the model's drift a(y, t)."""
    total = 0

    def count(_module, _inputs, output):
        nonlocal total
        for out in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(out, torch.Tensor):
                total += out.numel() * out.element_size()

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        y = torch.zeros(2, *shape, device=device)
        t = torch.full((2,), 0.5 * model.sde.T, device=device)
        was_training = model.training
        model.eval()
        model.a(y, t)
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    data = math.prod(shape) * 4
    return (total + 4 * data) // 2


def check_batch_fits(key: str, count: int, per_example: int, device: torch.device, source: str,
                     factor: float = FACTOR) -> None:
    """ConfigError naming ``key`` when ``count`` examples clearly cannot fit in the device's memory."""
    free = available_bytes(device)
    need = count * per_example * factor
    if free is not None and need > free:
        raise ConfigError(f"{source}: {key}: {count:,} examples need about {_size(need)} of memory (estimated), "
                          f"more than the {_size(free)} available on {device.type}; lower it")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1024 or unit == "PB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"


def check_run_fits(model, exp, shape: tuple[int, ...], device: torch.device, world: int = 1) -> None:
    """A run's batch sizes and sample count that clearly cannot fit are config errors, before any allocation
    (the training batch is this rank's share of ``train.batch_size``)."""
    per_example = bytes_per_example(model, tuple(shape), device)
    check_batch_fits("train.batch_size", -(-exp.train.batch_size // world), per_example, device, exp.source)
    check_batch_fits("eval.batch_size", exp.eval.batch_size * exp.eval.samples_per_example, per_example,
                     device, exp.source)
    check_batch_fits("sample.num", exp.sample.num, per_example, device, exp.source, factor=1.5)
