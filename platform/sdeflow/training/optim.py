"""The optimisation state's parts: Adam, learning-rate schedules applied to the groups' base rates, the
EMA of the weights, per-step seeds, the loss window."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from ..core.interfaces import LRSchedule
from ..core.seeding import derive_seed


def fused_where_possible(groups: Sequence[Any]) -> bool | None:
    """``fused=`` for a torch optimizer over ``groups`` (parameters or ``{"params": [...]}`` dicts): True
    where PyTorch has a fused one-kernel update for every parameter's device, else None (its default)."""
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return True if fused else None


def adam(parameters, lr: float) -> torch.optim.Adam:
    """Adam over parameters or parameter groups (``{"params": [...], "lr": ...}``; ``lr`` for those
    without one), with PyTorch's fused one-kernel update where it has one for the parameters' device.

    On the CPU it measured 1.5 ms instead of 5.3 ms per step for the MNIST U-net's 1.5M parameters.
    """
    groups = list(parameters)
    return torch.optim.Adam(groups, lr=lr, fused=fused_where_possible(groups))


def base_rates(optimizer: torch.optim.Optimizer) -> list[float]:
    """Each group's configured rate, before any schedule scales it."""
    return [float(group["lr"]) for group in optimizer.param_groups]


def set_rates(optimizer: torch.optim.Optimizer, rates: Sequence[float], factor: float) -> None:
    """Group i steps at ``rates[i] × factor`` (exactly ``rates[i]`` when the factor is 1)."""
    for group, rate in zip(optimizer.param_groups, rates, strict=True):
        group["lr"] = rate * factor


def schedule_state(schedule: LRSchedule) -> dict[str, Any]:
    """What a checkpoint keeps of a schedule: its ``state_dict()``, or nothing for a function of the step."""
    state_dict = getattr(schedule, "state_dict", None)
    return dict(state_dict()) if callable(state_dict) else {}


def load_schedule_state(schedule: LRSchedule, state: dict[str, Any] | None) -> None:
    """Restore a schedule's state; a checkpoint without one (older runs, stateless schedules) leaves it fresh."""
    load = getattr(schedule, "load_state_dict", None)
    if state and callable(load):
        load(state)


def keep_configured(optimizer: torch.optim.Optimizer, configured: Sequence[dict[str, Any]],
                    settings: Sequence[str]) -> None:
    """After ``load_state_dict`` (which brings back the saved groups' settings): the configured value of
    each group's rate and of every optimizer setting in ``settings`` wins, as ``train.lr`` does on resume.
    Other group entries (a schedule-free optimizer's running sums) stay as saved: they are state."""
    for group, wanted in zip(optimizer.param_groups, configured, strict=True):
        for key in ("lr", *settings):
            if key in wanted:
                group[key] = wanted[key]


def micro_batches(x: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """``train.accumulate``: n equal consecutive slices of this rank's batch (n divides it, checked with the
    config), each a forward and backward of its own whose gradients add up to the whole batch's."""
    return x.chunk(n) if n > 1 else (x,)


def gradient_sync(module: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """Under DDP only the step's last micro-batch all-reduces; the others accumulate locally (``no_sync``)."""
    if last or not hasattr(module, "no_sync"):
        return contextlib.nullcontext()
    return module.no_sync()


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
