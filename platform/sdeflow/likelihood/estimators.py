"""The named likelihood estimators of ``sdeflow eval``: what ``eval.estimator`` may list, and how each is built.

    elbo           the ELBO in divergence form, Hutchinson probe (MATH.md §5): the reference
    dsm_elbo       the same ELBO in denoising form (MATH.md §9): no divergence above t_ε
    combined_elbo  both forms on the same draws, combined per log-t bin with weights fitted on a
                   pilot pass (any fixed combination is unbiased; see :class:`CombinedELBO`)
    ode            log p(x) through the probability-flow ODE (MATH.md §7)

An estimator is a callable ``estimate(model, z, generator) -> Tensor``: log p(z) or its lower bound per
example, in nats, shape (B,). Every estimator built here also has

- ``settings``: a dict of plain JSON values holding everything besides the weights, the data and the
  seed that determines its result (K, probe, time sampler, proposal, pilot size, ODE tolerances, ...),
  for eval.json;
- ``prepare(model, z_pilot, generator)``, to be called ONCE before the evaluation loop, on every rank,
  with the same arguments. ``z_pilot`` is a batch of examples in model space (after the data transform),
  e.g. the first ``eval.pilot_examples`` examples of the split being evaluated, dequantized with their own
  noise; ``generator`` is a stream used for nothing else (:func:`pilot_generator`). The pilot draws only
  have to be independent of the evaluation's draws for the estimate to stay unbiased: what is fitted
  (combination weights, the fitted time proposal) is then a fixed function during the loop, and every
  such function gives an unbiased estimator. It may be called on a model in eval mode under no_grad; it
  processes ``z_pilot`` in chunks of ``eval.batch_size`` examples. Calling it is a no-op for estimators
  with nothing to fit, and an estimator that is never prepared uses its unfitted defaults (weights ½,
  the configured time sampler), which are unbiased too;
- ``fitted``: None, or after ``prepare`` a JSON dict of what was fitted (for eval.json), which
  ``load_fitted`` restores, e.g. to make every rank use rank 0's fit bit for bit.

Validate ``eval.estimator`` with :func:`parse_estimators` when the config is checked (``sdeflow check``).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from ..components.registry import Registry, default_registry
from ..core.errors import ConfigError, InvalidArgument, did_you_mean
from ..core.interfaces import SDE, TimeSampler
from ..core.seeding import derive_seed
from ..experiment.config import EvalConfig
from .elbo import require_linear_drift
from .ode import ode_estimator

BUILTIN_ESTIMATORS = ("elbo", "dsm_elbo", "combined_elbo", "ode")
"""The built-in plugin's estimators (sdeflow_builtin.estimators registers them like any plugin's)."""
ESTIMATOR_NAMES = BUILTIN_ESTIMATORS  # kept for one release: the names are the registry's now
ALIASES = {"both": ("elbo", "ode")}


class Estimator(Protocol):
    settings: dict[str, Any]

    def __call__(self, model, z: Tensor, generator: torch.Generator) -> Tensor: ...


def parse_estimators(text: str, registry: Registry | None = None) -> list[str]:
    """``"elbo,ode"`` → ["elbo", "ode"]: names of registered estimators (``both`` means elbo,ode);
    duplicates dropped, order kept."""
    registry = registry or default_registry()
    known = registry.names("estimator")
    names: list[str] = []
    for word in (w.strip() for w in str(text).split(",")):
        if word not in ALIASES:
            try:
                registry.get("estimator", word)
            except ConfigError:
                accepted = ", ".join((*known, *ALIASES))
                raise InvalidArgument("estimator", f"unknown estimator {word!r}; expected a comma-separated list "
                                      f"of {accepted}{did_you_mean(word, (*known, *ALIASES))}") from None
        names += [n for n in ALIASES.get(word, (word,)) if n not in names]
    return names


def needs_linear_drift(name: str, registry: Registry | None = None) -> bool:
    """Whether estimator ``name`` takes the ELBO's denoising form (its factory declares
    ``requires_linear_drift``), so an SDE whose drift is not affine is refused up front."""
    factory = (registry or default_registry()).get("estimator", name).factory
    return bool(getattr(factory, "requires_linear_drift", False))


def pilot_generator(device: torch.device, seed: int, name: str) -> torch.Generator:
    """The pilot pass's own stream, unrelated to every evaluation batch's streams."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, "eval", "pilot", name))


def make_estimators(
    names: list[str] | str, cfg: EvalConfig, time_sampler: TimeSampler, *, samples: int | None = None,
    time_sampler_name: str | None = None, sde: SDE | None = None, registry: Registry | None = None,
) -> dict[str, Estimator]:
    """The named estimators (registered under the ``estimator`` kind) with ``cfg``'s settings; ``samples``
    overrides ``cfg.samples_per_example`` and ``time_sampler_name`` names ``time_sampler`` in the settings
    (default ``cfg.time_sampler``). With ``sde``, an SDE the denoising form cannot use is rejected now
    rather than at the first batch."""
    registry = registry or default_registry()
    names = parse_estimators(names if isinstance(names, str) else ",".join(names), registry)
    k = cfg.samples_per_example if samples is None else samples
    name = cfg.time_sampler if time_sampler_name is None else time_sampler_name
    out: dict[str, Estimator] = {}
    for est in names:
        if sde is not None and needs_linear_drift(est, registry):
            require_linear_drift(sde)
        out[est] = registry.get("estimator", est).factory(config=cfg, time_sampler=time_sampler, samples=k,
                                                         time_sampler_name=name)
    return out


# ------------------------------------------------------------------ the ODE


class ODE:
    """``ode``: :func:`sdeflow.likelihood.ode.ode_estimator` with its settings; ``nfe`` per batch as before."""

    name = "ode"
    fitted = None

    def __init__(self, config: EvalConfig, time_sampler: TimeSampler | None = None, samples: int | None = None,
                 time_sampler_name: str | None = None):
        """The ODE takes no time sampler; K (``samples``) is not used by it."""
        self.inner = ode_estimator(config)
        self.repeats, self.combine = self.inner.repeats, self.inner.combine
        self.settings = {"estimator": "ode", **self.inner.kwargs, "repeats": self.repeats, "combine": self.combine}

    @property
    def nfe(self) -> list[int]:
        return self.inner.nfe

    def __call__(self, model, z: Tensor, generator: torch.Generator) -> Tensor:
        return self.inner(model, z, generator)

    def prepare(self, model, z_pilot: Tensor, generator: torch.Generator) -> None:
        """Nothing to fit."""


def prepare_all(estimators: dict[str, Estimator], model, z_pilot: Tensor, *, seed: int) -> None:
    """Call every estimator's ``prepare`` with its own pilot stream (the evaluation loop's one-liner)."""
    for name, estimate in estimators.items():
        prepare = getattr(estimate, "prepare", None)
        if prepare is not None:
            prepare(model, z_pilot, pilot_generator(z_pilot.device, seed, name))


__all__ = ["BUILTIN_ESTIMATORS", "ODE", "Estimator", "make_estimators", "needs_linear_drift", "parse_estimators",
           "pilot_generator", "prepare_all"]
