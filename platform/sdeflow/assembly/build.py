"""Compose an experiment's components from the registry: SDE, network, parameterization → model; the
optimizer over the trainable parameter groups and its learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import attrs
import torch

from ..components.registry import Component, Registry, default_registry
from ..core.bounds import Bound, make_bound
from ..core.errors import ConfigError, InvalidArgument, PluginError, SdeflowError
from ..core.interfaces import SDE, DataBundle, Loss, LRSchedule, Sampler, TimeSampler
from ..core.model import DiffusionModel
from ..core.seeding import derive_seed
from ..core.transforms import ModelSpace
from ..evaluation.quality import parse_metrics
from ..experiment.config import COMPONENT_DEFAULTS, Experiment, check_values
from ..likelihood.elbo import require_linear_drift
from ..likelihood.estimators import needs_linear_drift, parse_estimators
from ..likelihood.ode import check_method
from .objective import check_trainable


def build_component(registry: Registry, exp: Experiment, kind: str, **injected: Any) -> Any:
    """Instantiate the component of ``kind``; a value the factory rejects names its dotted key."""
    component: Component = registry.get(kind, exp.components[kind]["name"])
    try:
        return component.factory(**injected, **exp.args(kind))
    except InvalidArgument as e:
        raise ConfigError(f"{exp.source}: {kind}.{e.argument}: {e.message}") from None
    except SdeflowError:
        raise  # already one line naming what to fix (a data set that is missing, ...)
    except Exception as e:  # a bug or an unchecked value inside the plugin: say whose
        origin = component.plugin.name + (f" ({component.plugin.distribution} {component.plugin.version})"
                                          if component.plugin.distribution else "")
        detail = " ".join(str(e).split())[:200]
        raise PluginError(f"{exp.source}: {kind} '{component.name}' of plugin '{origin}' failed to build: "
                          f"{type(e).__name__}: {detail}") from e


def plugin_versions(registry: Registry, exp: Experiment) -> dict[str, dict[str, Any]]:
    """Which plugin (and distribution version) supplied each component of the experiment."""
    out = {}
    for kind in exp.components:
        c = registry.get(kind, exp.components[kind]["name"])
        out[kind] = {"name": c.name, "plugin": c.plugin.name, "distribution": c.plugin.distribution,
                     "version": c.plugin.version}
    return out



@attrs.define
class Parts:
    """The SDE and the stateless components of an experiment (cheap to build, no data needed)."""

    sde: SDE
    time_sampler: TimeSampler
    loss: Loss
    sampler: Sampler
    eval_time_sampler: TimeSampler


def build_parts(exp: Experiment, registry: Registry | None = None) -> Parts:
    """Build everything that needs neither data nor weights; bad argument values fail here."""
    registry = registry or default_registry()
    eval_ts = registry.get("time_sampler", exp.eval.time_sampler, where=f"{exp.source}: eval.time_sampler")
    with torch.random.fork_rng(devices=[]):  # a trainable component's initial parameters depend on the seed only
        torch.manual_seed(derive_seed(exp.seed, "components"))
        return Parts(
            sde=build_component(registry, exp, "sde"),
            time_sampler=build_component(registry, exp, "time_sampler"),
            loss=build_component(registry, exp, "loss"),
            sampler=build_component(registry, exp, "sampler"),
            eval_time_sampler=eval_ts.factory(),
        )


def check_experiment(exp: Experiment, registry: Registry | None = None) -> Parts:
    """Every check ``train`` makes before loading data: names, arguments, values, run settings."""
    parts = build_parts(exp, registry)
    check_values(exp)
    check_accumulate(exp)
    if exp.sample.lam is not None:
        require_lambda_sampler(registry or default_registry(), exp, "sample.lam")
    if exp.sample.trajectories:
        require_lambda_sampler(registry or default_registry(), exp, "sample.trajectories")
    try:
        check_method(exp.eval.ode_method)
    except InvalidArgument as e:
        raise ConfigError(f"{exp.source}: eval.ode_method: {e.message}") from None
    check_bound(exp, registry or default_registry())
    check_optimization(exp, registry or default_registry())
    check_model(exp, parts, registry or default_registry())
    check_trainable(exp, {"sde": parts.sde, "loss": parts.loss, "time_sampler": parts.time_sampler})
    try:
        getattr(parts.loss, "check_sde", lambda sde: None)(parts.sde)
    except InvalidArgument as e:
        raise ConfigError(f"{exp.source}: loss.{e.argument}: {e.message} (sde: {exp.describe('sde')})") from None
    try:
        parse_metrics(exp.eval.metrics, registry)
        names = parse_estimators(exp.eval.estimator, registry)
        if any(needs_linear_drift(name, registry) for name in names):
            require_linear_drift(parts.sde)
    except InvalidArgument as e:
        raise ConfigError(f"{exp.source}: eval.{e.argument}: {e.message}") from None
    return parts


def data_shape(exp: Experiment, registry: Registry) -> tuple[int, ...] | None:
    """The data's shape as its plugin declares it without loading anything (an optional ``shape``
    attribute of the factory, called with the data section's arguments); None when it declares none."""
    component = registry.get("data", exp.components["data"]["name"])
    shape = getattr(component.factory, "shape", None)
    if shape is None:
        return None
    try:
        return tuple(int(n) for n in shape(**exp.args("data")))
    except InvalidArgument as e:
        raise ConfigError(f"{exp.source}: data.{e.argument}: {e.message}") from None


def check_model(exp: Experiment, parts: Parts, registry: Registry) -> None:
    """Build network → parameterization and the dequantizer on the meta device (no memory, no data), so
    every check their factories make runs at ``sdeflow check`` as at ``train`` (a U-net's ``ch`` and
    ``num_groups``, a trainable dequantizer the loss does not train, ...). Skipped when the data plugin
    declares no shape; a factory that cannot build on the meta device is left to ``train``."""
    shape = data_shape(exp, registry)
    if shape is None:
        return
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        try:
            model = build_model(exp, parts.sde, shape, registry)
            dequantizer = build_component(registry, exp, "dequantizer", data_shape=shape)
        except PluginError:
            return
    check_trainable(exp, {"sde": parts.sde, "parameterization": model.parameterization, "network": model.network,
                          "loss": parts.loss, "time_sampler": parts.time_sampler, "dequantizer": dequantizer})


def check_accumulate(exp: Experiment, world: int = 1) -> None:
    """``train.accumulate`` splits each rank's share of ``train.batch_size`` into equal micro-batches."""
    t = exp.train
    if t.accumulate < 1:
        raise ConfigError(f"{exp.source}: train.accumulate: must be at least 1 (micro-batches per step), "
                          f"got {t.accumulate}")
    if t.accumulate > 1 and t.batch_size % (t.accumulate * world):
        ranks = f" × {world} ranks" if world > 1 else ""
        raise ConfigError(f"{exp.source}: train.accumulate: {t.accumulate}{ranks} does not divide train.batch_size "
                          f"{t.batch_size} into equal micro-batches; pick a divisor of it")


def build_optimizer(exp: Experiment, groups: Sequence[dict[str, Any]], registry: Registry | None = None
                    ) -> torch.optim.Optimizer:
    """The experiment's optimizer over ``groups`` (each with its base rate), given ``train.lr``."""
    return build_component(registry or default_registry(), exp, "optimizer", params=list(groups), lr=exp.train.lr)


def build_lr_schedule(exp: Experiment, registry: Registry | None = None) -> LRSchedule:
    """The experiment's learning-rate schedule, told the run's length (``train.steps``)."""
    return build_component(registry or default_registry(), exp, "lr_schedule", steps=exp.train.steps)


def check_optimization(exp: Experiment, registry: Registry) -> None:
    """The optimizer builds (on a stand-in parameter) and the schedule gives a finite factor ≥ 0 at the
    first and last update, so bad values fail at ``sdeflow check`` naming their keys."""
    stand_in = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": exp.train.lr}]
    build_optimizer(exp, stand_in, registry)
    schedule = build_lr_schedule(exp, registry)
    for step in (0, exp.train.steps - 1):
        factor = schedule(step)
        if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor >= 0):
            raise ConfigError(f"{exp.source}: lr_schedule: {exp.describe('lr_schedule')} gives the factor {factor!r} "
                              f"at update {step}; a schedule's factor must be a finite number ≥ 0")


ABSURD_LR = 1.0
"""A learning rate above this is reported at check time (valid, but no Adam run trains with it)."""
MISMATCH = 10.0
"""Importance weights w(t)/q(t) spread over more than this factor count as a mismatched time sampler."""


def importance_weight_spread(loss: Loss, time_sampler: TimeSampler, sde: SDE, points: int = 2001
                             ) -> tuple[float, float]:
    """(max/min of q(t), max/min of w(t)/q(t)) on [t_ε, T], for a loss with a time weight w (MATH.md §4):
    an importance sampler matched to the loss makes w/q constant; (1, 1) when the loss has no weight."""
    weight = getattr(loss, "weight", None)
    if weight is None:
        return 1.0, 1.0
    t = torch.linspace(getattr(sde, "t_eps", 1e-3), sde.T, points, dtype=torch.float64)
    q = time_sampler.density(sde, t).double()
    r = weight(sde, t).double() / q
    return float(q.max() / q.min()), float(r.max() / r.min())


def advice(exp: Experiment, parts: Parts) -> list[str]:
    """Settings that are valid but almost surely not what was meant, one line each, naming the keys."""
    lines = []
    rates = {"train.lr": exp.train.lr, **{f"train.component_lr.{k}": v for k, v in exp.train.component_lr.items()}}
    for key, rate in rates.items():
        if isinstance(rate, (int, float)) and rate > ABSURD_LR:
            lines.append(f"{exp.source}: {key}: {rate:g} is far above any rate Adam trains with (at most about "
                         f"1e-2); the first update will likely make the weights non-finite, and then nothing is saved")
    q_spread, r_spread = importance_weight_spread(parts.loss, parts.time_sampler, parts.sde)
    if q_spread > 1.5 and r_spread > MISMATCH:
        fix = getattr(parts.loss, "matched_time_sampler_fix", None)
        lines.append(f"{exp.source}: time_sampler.name '{exp.components['time_sampler']['name']}' importance-samples t "
                f"for another weighting than loss '{exp.components['loss']['name']}' uses: its weights w(t)/q(t) "
                f"spread over a factor {r_spread:.0f}, a noisier estimate of the same loss, not the paper's "
                f"debiasing; {fix or 'pair it with a loss whose weight it matches'} (or time_sampler.name=uniform)")
    return lines


def require_lambda_sampler(registry: Registry, exp: Experiment, key: str) -> None:
    """λ-family features (``sample.lam``, trajectories) need a sampler with a ``lam`` argument."""
    name = exp.components["sampler"]["name"]
    if "lam" not in registry.get("sampler", name).arguments:
        raise ConfigError(f"{exp.source}: {key}: sampler '{name}' has no λ (no 'lam' argument); "
                          "use a λ-family sampler such as euler_maruyama")



def build_data(exp: Experiment, registry: Registry | None = None) -> DataBundle:
    return build_component(registry or default_registry(), exp, "data")


def build_model(exp: Experiment, sde: SDE, data_shape: tuple[int, ...], registry: Registry | None = None
                ) -> DiffusionModel:
    """network(data_shape) → parameterization(network, sde) → model."""
    registry = registry or default_registry()
    network = build_component(registry, exp, "network", data_shape=tuple(data_shape))
    parameterization = build_component(registry, exp, "parameterization", network=network, sde=sde)
    return DiffusionModel(sde, parameterization)


def build_bound(exp: Experiment, data: DataBundle) -> Bound:
    """The experiment's bound for its data (MATH.md §15); ``discrete`` on continuous data is a config error."""
    if exp.bound == "discrete" and data.levels is None:
        raise ConfigError(f"{exp.source}: bound: discrete needs data with levels (a decoder over them), but data "
                          f"'{exp.components['data']['name']}' is continuous; use bound: truncated or bound: paper")
    return make_bound(exp.bound, data.transform, data.levels)


def build_space(exp: Experiment, data: DataBundle, bound: Bound, sde: SDE, registry: Registry | None = None
                ) -> ModelSpace:
    """How data reach model space under ``bound`` (the experiment's, from :func:`build_bound`): the
    experiment's dequantizer (built for the data's shape, its initial parameters from the seed alone) when
    the data are discrete and the bound is the paper's, the bound's own otherwise; then the data set's
    transform."""
    spec = exp.components["dequantizer"]
    if data.levels is None and spec != COMPONENT_DEFAULTS["dequantizer"]:
        raise ConfigError(f"{exp.source}: dequantizer: {exp.describe('dequantizer')} needs discrete data, but "
                          f"data '{exp.components['data']['name']}' is continuous (its DataBundle has no levels); "
                          "remove the dequantizer section")
    dequantizer = None
    if data.levels is not None and not bound.from_t_eps:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(exp.seed, "dequantizer"))
            dequantizer = build_component(registry or default_registry(), exp, "dequantizer",
                                          data_shape=tuple(data.shape))
    return bound.space(data.transform, data.levels, dequantizer, sde)


def check_bound(exp: Experiment, registry: Registry) -> None:
    """The bound is finite for the parameterization (MATH.md §13) and owns the region below t_ε alone."""
    parameterization = registry.get("parameterization", exp.components["parameterization"]["name"]).factory
    if exp.bound == "paper" and not getattr(parameterization, "bounded_at_zero", True):
        raise ConfigError(f"{exp.source}: bound: paper integrates the ELBO to t = 0, where parameterization: "
                          f"{exp.describe('parameterization')} declares its integrand unbounded (MATH.md §13); "
                          "set bound: truncated or bound: discrete")
    if exp.bound != "paper" and exp.components["dequantizer"] != COMPONENT_DEFAULTS["dequantizer"]:
        raise ConfigError(f"{exp.source}: dequantizer: {exp.describe('dequantizer')} is the paper bound's choice; "
                          f"bound: {exp.bound} pays for [0, t_eps] its own way (MATH.md §15); remove the dequantizer "
                          "section or set bound: paper")
