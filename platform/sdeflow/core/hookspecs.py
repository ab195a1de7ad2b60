"""The hook specifications: one registration hook per kind of component.

A plugin implements any of these and calls ``register(name, factory)`` once per component it offers,
for example ``register("vp", VPSDE)``. The factory is called with the component's keyword arguments
from the experiment YAML; its typed signature is the argument schema the kernel validates against.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT = "sdeflow"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[..., Any]
"""``register(name, factory, *, description=None)``."""


@hookspec
def sdeflow_register_sdes(register: Register) -> None:
    """Register forward (inference) SDEs: subclasses of :class:`sdeflow.core.interfaces.SDE`."""


@hookspec
def sdeflow_register_networks(register: Register) -> None:
    """Register networks: ``nn.Module`` mapping (y, τ) to a tensor shaped like y (τ = t/T ∈ [0, 1])."""


@hookspec
def sdeflow_register_parameterizations(register: Register) -> None:
    """Register parameterizations: factories ``(network, sde, **kwargs)`` of :class:`Parameterization`."""


@hookspec
def sdeflow_register_losses(register: Register) -> None:
    """Register training losses: :class:`sdeflow.core.interfaces.Loss` subclasses."""


@hookspec
def sdeflow_register_time_samplers(register: Register) -> None:
    """Register time samplers: :class:`sdeflow.core.interfaces.TimeSampler` subclasses."""


@hookspec
def sdeflow_register_samplers(register: Register) -> None:
    """Register reverse-time samplers: :class:`sdeflow.core.interfaces.Sampler` subclasses."""


@hookspec
def sdeflow_register_dequantizers(register: Register) -> None:
    """Register dequantizers: factories ``(data_shape, **kwargs)`` of :class:`sdeflow.core.interfaces.Dequantizer`."""


@hookspec
def sdeflow_register_datasets(register: Register) -> None:
    """Register data sets: factories returning a :class:`sdeflow.core.interfaces.DataBundle`."""


@hookspec
def sdeflow_register_estimators(register: Register) -> None:
    """Register likelihood estimators (``eval.estimator``): factories ``(config, time_sampler, samples,
    time_sampler_name)`` of an :class:`sdeflow.likelihood.estimators.Estimator`, called as
    ``estimate(model, z, generator)`` → a lower bound on log p(z) per example, in nats."""


@hookspec
def sdeflow_register_metrics(register: Register) -> None:
    """Register sample-quality metrics (``eval.metrics``): :class:`sdeflow.evaluation.quality.Metric` objects or
    factories of them, comparing samples with held-out data (``space: data``) or Inception statistics."""


@hookspec
def sdeflow_register_optimizers(register: Register) -> None:
    """Register optimizers: factories ``(params, lr, **kwargs)`` of a ``torch.optim.Optimizer``, called with
    the trainable parameter groups (each ``{"params": [...], "lr": base rate}``) and ``train.lr``."""


@hookspec
def sdeflow_register_lr_schedules(register: Register) -> None:
    """Register learning-rate schedules: factories ``(steps, **kwargs)`` (``steps``: ``train.steps``) of an
    :class:`sdeflow.training.optim.LRSchedule`, ``schedule(k)`` → the factor of every group's base rate at update k."""


KINDS: dict[str, str] = {
    "sde": "sdeflow_register_sdes",
    "network": "sdeflow_register_networks",
    "parameterization": "sdeflow_register_parameterizations",
    "loss": "sdeflow_register_losses",
    "time_sampler": "sdeflow_register_time_samplers",
    "sampler": "sdeflow_register_samplers",
    "data": "sdeflow_register_datasets",
    "dequantizer": "sdeflow_register_dequantizers",
    "estimator": "sdeflow_register_estimators",
    "metric": "sdeflow_register_metrics",
    "optimizer": "sdeflow_register_optimizers",
    "lr_schedule": "sdeflow_register_lr_schedules",
}
"""Component kind → the hook that registers it. Every kind but ``estimator`` and ``metric`` is an experiment
YAML section; those two are named in the ``eval`` section (``eval.estimator``, ``eval.metrics``)."""
