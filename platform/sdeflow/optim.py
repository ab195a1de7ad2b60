"""The optimisation state's parts: Adam, the EMA of the weights, per-step seeds, the loss window."""

from __future__ import annotations

import contextlib

import torch

from .checkpoint import derive_seed


def adam(parameters, lr: float) -> torch.optim.Adam:
    """Adam over parameters or parameter groups (``{"params": [...], "lr": ...}``; ``lr`` for those
    without one), with PyTorch's fused one-kernel update where it has one for the parameters' device.

    On the CPU it measured 1.5 ms instead of 5.3 ms per step for the MNIST U-net's 1.5M parameters.
    """
    groups = list(parameters)
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.Adam(groups, lr=lr, fused=True if fused else None)


class EMA:
    """θ_ema ← θ_ema + (1 − d)(θ − θ_ema) after each step, d = min(decay, (1 + k)/(10 + k)) with warm-up
    (so a short run is not stale) or ``decay`` itself; ``decay = 0`` copies. Buffers are copied."""

    def __init__(self, ema: torch.nn.Module, model: torch.nn.Module, decay: float, warmup: bool):
        # Pairs taken before wrapping: DDP and compile wrappers must not change what the EMA tracks.
        self.ema, self.model = ema, model
        self.pairs = (list(ema.parameters()), [p.detach() for p in model.parameters()])
        self.decay, self.warmup = decay, warmup

    def decay_after(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        ema_params, params = self.pairs
        if self.decay == 0:
            torch._foreach_copy_(ema_params, params)
        else:
            torch._foreach_lerp_(ema_params, params, 1 - self.decay_after(step))
        for b_ema, b in zip(self.ema.buffers(), self.model.buffers()):
            b_ema.copy_(b)


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of every random draw of training step ``step`` on ``rank``."""
    return derive_seed(seed, "train", rank, step)


class Window:
    """The training losses and seconds since the last log line."""

    def __init__(self, zero: torch.Tensor):
        self.loss, self.steps, self.seconds = zero, 0, 0.0

    def add(self, loss: torch.Tensor, seconds: float) -> None:
        self.loss = self.loss + loss
        self.steps += 1
        self.seconds += seconds

    def mean(self) -> torch.Tensor:
        return self.loss / self.steps

    def reset(self) -> None:
        self.loss, self.steps, self.seconds = torch.zeros_like(self.loss), 0, 0.0


@contextlib.contextmanager
def unwrapped(parameterization, raw_network: torch.nn.Module):
    """Temporarily put the plain network back (state dicts without DDP/compile prefixes)."""
    wrapped = parameterization.network
    parameterization.network = raw_network
    try:
        yield
    finally:
        parameterization.network = wrapped
