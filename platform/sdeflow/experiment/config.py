"""Experiment configs: YAML files with dotted overrides, checked in full before anything runs.

Run settings are attrs classes; each component section is ``{name: <registered name>, **arguments}``
and is checked against the registered factory's own signature. Every error is one line naming the
file, the dotted key, the value given and what is accepted.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs
import yaml

from ..components.registry import Registry, default_registry
from ..components.schema import Argument, TypeMismatch, check_arguments, coerce, type_name
from ..core.errors import ConfigError, did_you_mean
from .files import read_yaml, safe_load_capped


@attrs.define(kw_only=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 128
    accumulate: int = 1  # micro-batches of batch_size/accumulate per step, gradients summed (same update)
    lr: float = 1e-4  # the base rate the lr_schedule scales
    component_lr: dict[str, float] = attrs.field(factory=dict)  # {sde: 1e-3}: a trainable component's own rate
    ema: float = 0.999
    ema_warmup: bool = True
    grad_clip: float | None = None
    log_every: int = 100
    eval_every: int = 0
    sample_every: int = 0
    checkpoint_every: int = 1000
    checkpoint_minutes: float = 0.0  # also checkpoint after this much wall time (0: only by steps)
    compile: bool = False
    channels_last: bool = False
    num_workers: int = 0


@attrs.define(kw_only=True)
class EvalConfig:
    max_examples: int | None = None
    batch_size: int = 256
    samples_per_example: int = 1
    probe: Literal["rademacher", "gaussian", "exact"] = "rademacher"
    time_sampler: str = "uniform"
    estimator: str = "elbo"  # comma-separated names of sdeflow.likelihood.estimators (check with parse_estimators)
    time_proposal: Literal["sampler", "fitted"] = "sampler"  # fitted: on a pilot pass, mixed with debiased
    stratify_time: bool = False  # the K samples of an example at stratified u_k = (k + u)/K
    pilot_examples: int = 256
    proposal_bins: int = 24
    combined_weight: float | None = None  # combined_elbo: w of the divergence form; None: fitted per bin
    ode_t0: float = 1e-5
    ode_rtol: float = 1e-5
    ode_atol: float = 1e-5
    ode_method: str = "dopri5"
    ode_time: Literal["t", "log_t", "log_snr"] = "t"  # the variable the ODE solver steps in (MATH.md §7)
    ode_repeats: int = 1  # solves per example, each with its own dequantization draw and probe
    ode_combine: Literal["mean", "logmeanexp"] = "mean"  # of the repeats: mean, or log-mean-exp (i-DODE)
    metrics: str = ""  # comma-separated sample-quality metrics (sdeflow.evaluation.quality: swd, mmd, fid, kid) on test
    fid_samples: int = 50_000  # samples fid and kid draw (the protocol's 50k)
    fid_reference: int | None = None  # training images in the reference statistics (None: all of them)
    fid_inception: str | None = None  # TorchScript Inception-v3; None: the copy of the "sdeflow[fid]" extra
    fid_cache: str | None = None  # folder of cached feature statistics; None: ~/.cache/sdeflow/fid


@attrs.define(kw_only=True)
class SampleConfig:
    num: int = 64
    steps: int | None = None
    lam: float | None = None
    trajectories: bool = False


@attrs.define(kw_only=True)
class LoggingConfig:
    tensorboard: bool = True
    progress: bool = True


SECTIONS = {"train": TrainConfig, "eval": EvalConfig, "sample": SampleConfig, "logging": LoggingConfig}
COMPONENT_DEFAULTS: dict[str, dict[str, Any] | None] = {
    "data": None,
    "sde": {"name": "vp"},
    "network": None,
    "parameterization": {"name": "drift"},
    "loss": {"name": "dsm"},
    "time_sampler": {"name": "uniform"},
    "sampler": {"name": "euler_maruyama"},
    "dequantizer": {"name": "uniform"},  # applied to discrete data only (DataBundle.levels)
    "optimizer": {"name": "adam"},  # of every trainable parameter group, at train.lr (train.component_lr)
    "lr_schedule": {"name": "constant"},  # the factor of each group's base rate at each update
}
TOP_LEVEL = {
    "name": str,
    "seed": int,
    "device": Literal["auto", "cpu", "cuda"],
    "precision": Literal["fp32", "bf16"],
    "bound": Literal["paper", "discrete", "truncated"],  # how the likelihood pays for [0, t_eps] (sdeflow.core.bounds)
    "ablations": list,
    "sweep": dict,
    "launcher": dict,  # where a sweep's variants run: sdeflow.sweeps.launchers.read_launcher checks it
}


@attrs.define(kw_only=True)
class Experiment:
    """A fully checked experiment: run settings plus one ``{name, **args}`` spec per component kind."""

    name: str
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    bound: str = "paper"
    components: dict[str, dict[str, Any]]
    train: TrainConfig = attrs.Factory(TrainConfig)
    eval: EvalConfig = attrs.Factory(EvalConfig)
    sample: SampleConfig = attrs.Factory(SampleConfig)
    logging: LoggingConfig = attrs.Factory(LoggingConfig)
    ablations: list = attrs.Factory(list)
    sweep: dict = attrs.Factory(dict)
    launcher: dict = attrs.Factory(dict)
    source: str = "<config>"

    def describe(self, kind: str) -> str:
        """A component's spec as written in YAML flow style, ``{name: vp, beta_max: 10}``, for messages."""
        return "{" + ", ".join(f"{k}: {v}" for k, v in self.components[kind].items()) + "}"

    def args(self, kind: str) -> dict[str, Any]:
        """The keyword arguments of a component (its spec without ``name``)."""
        return {k: v for k, v in self.components[kind].items() if k != "name"}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "seed": self.seed, "device": self.device,
                               "precision": self.precision, "bound": self.bound}
        out.update({kind: _plain(spec) for kind, spec in self.components.items()})
        out.update({key: _plain(attrs.asdict(getattr(self, key))) for key in SECTIONS})
        if self.ablations:
            out["ablations"] = _plain(self.ablations)
        if self.sweep:
            out["sweep"] = _plain(self.sweep)
        if self.launcher:
            out["launcher"] = _plain(self.launcher)
        return out


def _plain(value: Any) -> Any:
    """YAML-friendly copy: tuples become lists."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------- loading


def parse_override(text: str, source: str = "command line") -> tuple[str, Any]:
    """``a.b.c=value`` → ("a.b.c", value), the value read as YAML (``10``, ``1.0e-3``, ``[1, 2]``, ``null``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(f"{source}: override {text!r} is not of the form key.sub=value")
    try:
        value = safe_load_capped(raw, f"{source}: override {key.strip()}") if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any], source: str) -> dict[str, Any]:
    """A copy of ``data`` with each dotted key set; intermediate sections are created as needed."""
    data = copy.deepcopy(data)
    for dotted, value in overrides.items():
        node = data
        parts = dotted.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: {'.'.join(parts[: i + 1])}: is {child!r}, cannot set {dotted}")
            node = child
        node[parts[-1]] = value
    return data


def load_experiment(
    path: str | Path,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    registry: Registry | None = None,
    prefer: Mapping[str, str] | None = None,
) -> Experiment:
    """Read, override and check an experiment file (nothing is built, no data is loaded).

    ``prefer`` ({kind: plugin}) settles a name that two plugins register, as recorded by an existing run.
    """
    data = read_experiment_data(path, overrides)
    return structure(data, str(path), registry or default_registry(), default_name=Path(path).stem,
                     prefer=prefer)


def read_experiment_data(path: str | Path, overrides: Sequence[str] | Mapping[str, Any] = ()) -> dict[str, Any]:
    """The experiment file's mapping with the overrides applied (not yet checked)."""
    data = read_yaml(path)
    if not isinstance(overrides, Mapping):
        overrides = dict(parse_override(o, str(path)) for o in overrides)
    return apply_overrides(data, overrides, str(path))


def structure(
    data: Mapping[str, Any], source: str, registry: Registry, default_name: str = "experiment",
    prefer: Mapping[str, str] | None = None,
) -> Experiment:
    """Check a config mapping and return the :class:`Experiment`; ``source`` names it in errors."""
    known = set(TOP_LEVEL) | set(SECTIONS) | set(COMPONENT_DEFAULTS)
    for key in data:
        if key not in known:
            raise ConfigError(f"{source}: {key}: unknown section{did_you_mean(str(key), known)}; "
                              f"accepted: {', '.join(sorted(known))}")
    top = {key: _check_value(source, key, data[key], kind) for key, kind in TOP_LEVEL.items() if key in data}
    top.setdefault("name", default_name)
    sections = {key: structure_section(data.get(key), cls, source, key) for key, cls in SECTIONS.items()}
    prefer = prefer or {}
    components = {kind: check_component(registry, kind, data.get(kind), source, prefer.get(kind))
                  for kind in COMPONENT_DEFAULTS}
    return Experiment(components=components, source=source, **top, **sections)


def check_values(exp: Experiment) -> None:
    """Every run setting in its range (counts ≥ 1, intervals ≥ 0, rates > 0, ...): a one-line ConfigError
    naming the dotted key. Components check their own arguments when built."""
    t = exp.train
    for key, value in [("steps", t.steps), ("batch_size", t.batch_size), ("eval.batch_size", exp.eval.batch_size),
                       ("eval.samples_per_example", exp.eval.samples_per_example), ("sample.num", exp.sample.num)]:
        if value < 1:
            name = key if "." in key else f"train.{key}"
            raise ConfigError(f"{exp.source}: {name}: must be at least 1, got {value}")
    for key in ("log_every", "eval_every", "sample_every", "checkpoint_every", "num_workers"):
        if getattr(t, key) < 0:
            raise ConfigError(f"{exp.source}: train.{key}: must be 0 (never) or positive, got {getattr(t, key)}")
    if t.checkpoint_minutes < 0:
        raise ConfigError(f"{exp.source}: train.checkpoint_minutes: must be 0 (only by steps) or positive, "
                          f"got {t.checkpoint_minutes}")
    if t.grad_clip is not None and not t.grad_clip > 0:
        raise ConfigError(f"{exp.source}: train.grad_clip: must be positive (the largest gradient norm) or null, "
                          f"got {t.grad_clip}")
    if not 0 <= exp.seed < 2**63:
        raise ConfigError(f"{exp.source}: seed: must be in [0, 2**63), got {exp.seed}")
    if not (t.lr > 0):
        raise ConfigError(f"{exp.source}: train.lr: must be positive, got {t.lr}")
    if not (0 <= t.ema < 1):
        raise ConfigError(f"{exp.source}: train.ema: must be in [0, 1), got {t.ema}")
    if exp.sample.lam is not None and not 0 <= exp.sample.lam <= 1:
        raise ConfigError(f"{exp.source}: sample.lam: must be in [0, 1], got {exp.sample.lam}")
    if exp.eval.max_examples is not None and exp.eval.max_examples < 1:
        raise ConfigError(f"{exp.source}: eval.max_examples: must be at least 1 (or null for all), "
                          f"got {exp.eval.max_examples}")
    if exp.sample.steps is not None and exp.sample.steps < 1:
        raise ConfigError(f"{exp.source}: sample.steps: must be at least 1, got {exp.sample.steps}")
    for key in ("pilot_examples", "proposal_bins", "ode_repeats"):
        if getattr(exp.eval, key) < 1:
            raise ConfigError(f"{exp.source}: eval.{key}: must be at least 1, got {getattr(exp.eval, key)}")


def _check_value(source: str, key: str, value: Any, annotation: Any) -> Any:
    try:
        return coerce(value, annotation)
    except TypeMismatch as e:
        raise ConfigError(f"{source}: {key}: expected {e.expected}, got {value!r}") from None


def structure_section(value: Any, cls: type, source: str, key: str) -> Any:
    if value is None:
        return cls()
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: {key}: expected a mapping of settings, got {value!r}")
    fields = {f.name: f for f in attrs.fields(attrs.resolve_types(cls))}
    accepted = ", ".join(f"{f.name}: {type_name(f.type)}" for f in fields.values())
    checked = {}
    for name, item in value.items():
        if name not in fields:
            raise ConfigError(f"{source}: {key}.{name}: unknown setting{did_you_mean(str(name), fields)}; "
                              f"accepted: {accepted}")
        checked[name] = _check_value(source, f"{key}.{name}", item, fields[name].type)
    return cls(**checked)


def check_component(registry: Registry, kind: str, spec: Any, source: str, prefer: str | None = None
                    ) -> dict[str, Any]:
    """Check a ``{name, **args}`` spec against the registered factory; returns the checked spec with every
    argument the factory takes (defaults filled in: the effective values, which config.yaml records), its
    name qualified (``plugin:name``) when two plugins register it and ``prefer`` picked one."""
    if spec is None:
        spec = COMPONENT_DEFAULTS[kind]
        if spec is None:
            raise ConfigError(f"{source}: {kind}: missing section; expected {{name: <one of "
                              f"{', '.join(registry.names(kind)) or 'no registered ' + kind}>, ...}}")
    if isinstance(spec, str):
        spec = {"name": spec}
    if isinstance(spec, Mapping) and "name" not in spec and COMPONENT_DEFAULTS[kind]:
        spec = {**COMPONENT_DEFAULTS[kind], **spec}  # `loss.weighting=...` on the default loss
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
        raise ConfigError(f"{source}: {kind}.name: expected the name of a registered {kind} "
                          f"({', '.join(registry.names(kind))}), got {spec!r}")
    component = registry.get(kind, spec["name"], where=f"{source}: {kind}.name", prefer=prefer)
    name = component.qualified_name if registry.is_ambiguous(kind, spec["name"]) else spec["name"]
    args = {k: v for k, v in spec.items() if k != "name"}
    checked = check_arguments(args, component.arguments, f"{source}: {kind}", f"{kind} '{spec['name']}'")
    return {"name": name, **with_defaults(checked, component.arguments)}


def with_defaults(given: Mapping[str, Any], arguments: Mapping[str, Argument]) -> dict[str, Any]:
    """``given`` arguments with the defaults of the others, in the factory's order (a default that YAML
    cannot hold, such as an object, is left to the factory)."""
    out = {}
    for name, argument in arguments.items():
        if name in given:
            out[name] = given[name]
        elif not argument.required and is_plain(argument.default):
            out[name] = _plain(argument.default)
    return out


def is_plain(value: Any) -> bool:
    """Whether YAML writes ``value`` and reads it back as it was (tuples read back as lists)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_plain(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and is_plain(v) for k, v in value.items())
    return False
