"""A third-party estimator and a third-party metric, built on sdeflow's public pieces only.

- ``ode_rk4``: log p(z) through the probability-flow ODE with fixed-step RK4 (100 steps, 400 network
  evaluations a solve): a cost that does not depend on the model, unlike the adaptive default ``ode``.
  It follows the experiment's bound like the built-in ODE (MATH.md §15).
- ``mean_distance``: ‖mean(samples) − mean(held-out)‖₂, a first-moment check beside its floor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sdeflow.plugin import Metric, ODEEstimator


class RK4ODE:
    """``ode_rk4``: the ODE likelihood of :class:`sdeflow.likelihood.ode.ODEEstimator` with torchdiffeq's rk4."""

    def __init__(self, config, time_sampler=None, samples=None, time_sampler_name=None):
        self.inner = ODEEstimator(config.probe, config.ode_t0, "rk4", config.ode_rtol, config.ode_atol)
        self.settings = {"estimator": "ode_rk4", "probe": config.probe, "t0": config.ode_t0, "method": "rk4",
                         "steps": 100}

    @property
    def nfe(self) -> list[int]:
        return self.inner.nfe

    def __call__(self, model, z: Tensor, generator: torch.Generator) -> Tensor:
        return self.inner(model, z, generator)


class MeanDistance(Metric):
    """‖mean(a) − mean(b)‖₂ over the flattened examples."""

    space = "data"

    def compare(self, a: Tensor, b: Tensor, *, generator: torch.Generator) -> float:
        a, b = a.double().reshape(len(a), -1), b.double().reshape(len(b), -1)
        return float((a.mean(dim=0) - b.mean(dim=0)).norm())
