"""Built-in learning-rate schedules: the factor of every group's base rate at update k = 0, 1, … (a pure
function of k, so a resumed run repeats the uninterrupted one exactly).

- ``constant``: 1 (the default);
- ``warmup``: (k + 1)/W for the first W updates, then 1;
- ``warmup_cosine``: the warm-up, then a half cosine from 1 down to ``final_fraction`` at ``decay_steps``;
- ``warmup_linear``: the warm-up, then a straight line from 1 down to ``final_fraction`` at ``decay_steps``.

``steps`` is ``train.steps``, the default end of the decay; after ``decay_steps`` the factor stays at
``final_fraction``. Set ``decay_steps`` to keep the schedule fixed when a run is extended.
"""

from __future__ import annotations

import math

from sdeflow.plugin import hookimpl, require


class Constant:
    """Every update at the base rate (``train.lr``, ``train.component_lr``)."""

    def __init__(self, steps: int):
        self.steps = steps

    def __call__(self, step: int) -> float:
        return 1.0


class Warmup:
    """Linear warm-up from lr/W to lr over the first ``warmup_steps`` = W updates, then constant."""

    def __init__(self, steps: int, warmup_steps: int = 1000):
        require(warmup_steps >= 1, "warmup_steps", f"must be at least 1, got {warmup_steps}")
        self.steps, self.warmup_steps = steps, warmup_steps

    def __call__(self, step: int) -> float:
        return min(1.0, (step + 1) / self.warmup_steps)


class _WarmupDecay:
    """Warm-up over W updates, then a decay in the progress p = (k − W)/(D − W) ∈ [0, 1] from 1 to f."""

    def __init__(self, steps: int, warmup_steps: int = 0, decay_steps: int | None = None,
                 final_fraction: float = 0.0):
        require(warmup_steps >= 0, "warmup_steps", f"must be 0 or positive, got {warmup_steps}")
        decay_steps = steps if decay_steps is None else decay_steps
        require(decay_steps > warmup_steps, "decay_steps",
                f"must be more than warmup_steps ({warmup_steps}), got {decay_steps}")
        require(0.0 <= final_fraction <= 1.0, "final_fraction", f"must be in [0, 1], got {final_fraction}")
        self.steps, self.warmup_steps = steps, warmup_steps
        self.decay_steps, self.final_fraction = decay_steps, final_fraction

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.decay_steps - self.warmup_steps))
        return self.final_fraction + (1.0 - self.final_fraction) * self.decay(progress)

    def decay(self, progress: float) -> float:
        raise NotImplementedError


class WarmupCosine(_WarmupDecay):
    """Linear warm-up, then f + (1 − f)·½(1 + cos πp) (SGDR, Loshchilov & Hutter 2017, eq. 5, one cycle)."""

    def decay(self, progress: float) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupLinear(_WarmupDecay):
    """Linear warm-up, then f + (1 − f)(1 − p): a straight line down to ``final_fraction``."""

    def decay(self, progress: float) -> float:
        return 1.0 - progress


@hookimpl
def sdeflow_register_lr_schedules(register) -> None:
    register("constant", Constant)
    register("warmup", Warmup)
    register("warmup_cosine", WarmupCosine)
    register("warmup_linear", WarmupLinear)
