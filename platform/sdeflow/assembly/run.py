"""A run rebuilt in memory: an experiment's components, data, model and EMA copy, built fresh
(:func:`build_run`) or from a run folder's config.yaml and newest usable checkpoint (:func:`open_run`),
and what evaluation and sampling do with it. The folder's own rules are :mod:`sdeflow.rundir.folder`'s."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch

from ..components.registry import Registry, default_registry
from ..core.bounds import BOUND_NAMES, Bound
from ..core.distributed import DistContext
from ..core.errors import ConfigError, InvalidArgument
from ..core.interfaces import DataBundle
from ..core.model import DiffusionModel
from ..core.transforms import ModelSpace
from ..evaluation.evaluate import evaluate
from ..evaluation.figures import save_samples, save_trajectories
from ..experiment.config import COMPONENT_DEFAULTS, Experiment, check_component
from ..likelihood.estimators import make_estimators
from ..rundir.checkpoint import UnreadableCheckpoint
from ..rundir.folder import CONFIG_FILE, LAST, PinnedFolder, restore, run_experiment, say
from .build import (
    Parts,
    build_bound,
    build_component,
    build_data,
    build_model,
    build_space,
    check_bound,
    check_experiment,
    require_lambda_sampler,
)
from .objective import Objective, check_trainable

SAMPLES_DIR = "samples"


def resolve_device(name: str, source: str = "config") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{source}: device: 'cuda' requested but CUDA is not available here")
    return torch.device(name)


@attrs.define
class Run:
    """An experiment built in a run folder: components, data, the model and its EMA copy."""

    exp: Experiment
    run_dir: Path
    parts: Parts
    data: DataBundle
    model: DiffusionModel
    ema: DiffusionModel
    device: torch.device
    registry: Registry
    ctx: DistContext = attrs.field(factory=DistContext)
    step: int = 0
    """Training steps behind the loaded weights."""
    objective: Objective | None = None
    """The loss of ``model`` with the trainable loss and time sampler: what training optimises."""
    ema_objective: Objective | None = None
    """Its EMA copy, whose model is ``ema``."""
    folder: PinnedFolder | None = None
    """The folder a trained run was read from, followed if it is moved (None: a run being trained)."""

    def records_dir(self) -> Path:
        """Where this run's evaluations and samples are recorded: the folder its weights came from."""
        return self.folder.now() if self.folder else self.run_dir

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / LAST

    def evaluate(self, *, split: str = "test", max_examples: int | None = None, samples: int | None = None,
                 estimator: str | None = None, time_sampler: str | None = None,
                 batch_size: int | None = None, dequantizer: str | dict[str, Any] | None = None,
                 bound: str | None = None) -> dict[str, Any]:
        """Every named estimator on ``split``: summaries, per-example values and the settings that
        (with the seed) fix the result. ``dequantizer`` (a name or a ``{name, **args}`` spec) evaluates
        under another dequantizer than the experiment's; a variational one is then untrained. ``bound``
        (paper, discrete, truncated) evaluates the trained model under another bound (MATH.md §15)."""
        cfg = self.exp.eval
        estimators = self.estimators(estimator or cfg.estimator, time_sampler, samples)
        batch_size = cfg.batch_size if batch_size is None else batch_size
        max_examples = max_examples if max_examples is not None else cfg.max_examples
        space, spec, used = self.space(dequantizer, bound)
        self.ema.eval()
        own_bound = self.ema.bound
        try:
            self.ema.bound = used
            results = evaluate(self.ema, self.data, estimators, batch_size=batch_size, seed=self.exp.seed,
                               device=self.device, ctx=self.ctx, split=split, max_examples=max_examples,
                               pilot_examples=cfg.pilot_examples, space=space)
        finally:
            self.ema.bound = own_bound
        # The headline is the experiment's own evaluation (its eval settings: examples, K, time sampler,
        # batches, its dequantizer and bound); a result with other settings (--max-examples 200) is kept
        # beside it, never in its place.
        own_dequantizer = spec == self.exp.components["dequantizer"]
        own = (max_examples == cfg.max_examples and batch_size == cfg.batch_size and own_dequantizer
               and used.name == self.exp.bound
               and samples in (None, cfg.samples_per_example) and time_sampler in (None, cfg.time_sampler))
        for name, result in results.items():
            result["full"] = own
            deq = spec if not used.from_t_eps else {"name": f"matched_truncated_normal (bound: {used.name})"}
            result["protocol"] = {"weights": "ema", **used.protocol(), **space.protocol(deq),
                                  "se": "std of per-example bpd / sqrt(n)",
                                  **({"data": self.data.protocol} if self.data.protocol else {})}
            estimate = estimators.get(name)
            result["settings"] = {**getattr(estimate, "settings", {}), "batch_size": batch_size,
                                  "max_examples": max_examples, "bound": used.name}
            if not own_dequantizer:
                result["settings"]["dequantizer"] = spec
            if getattr(estimate, "nfe", None):  # ODE solves: report their cost
                result["nfe"] = sum(estimate.nfe) / len(estimate.nfe)
            if getattr(estimate, "fitted", None):  # what the pilot pass fitted (weights, proposal)
                result["fitted"] = estimate.fitted
        return results

    def space(self, dequantizer: str | dict[str, Any] | None = None, bound: str | None = None
              ) -> tuple[ModelSpace, dict[str, Any], Bound]:
        """(the EMA's way from data to model space, the dequantizer's spec, the bound): the experiment's own,
        or the ones ``dequantizer`` and ``bound`` name (checked like the experiment's sections, built fresh)."""
        own = self.exp.components["dequantizer"]
        spec = own if dequantizer is None else check_component(self.registry, "dequantizer", dequantizer,
                                                                "--dequantizer")
        if bound is not None and bound not in BOUND_NAMES:
            raise ConfigError(f"--bound: unknown bound {bound!r}; expected one of {', '.join(BOUND_NAMES)}")
        bound = self.exp.bound if bound is None else bound
        if spec == own and bound == self.exp.bound:
            return self.ema_objective.space, own, self.ema.bound
        if bound != "paper" and dequantizer is None:
            spec = COMPONENT_DEFAULTS["dequantizer"]  # the other bound pays for [0, t_eps] its own way
        exp = attrs.evolve(self.exp, components={**self.exp.components, "dequantizer": spec}, bound=bound,
                           source="--bound" if dequantizer is None else "--dequantizer")
        check_bound(exp, self.registry)
        built = build_bound(exp, self.data) if bound != self.exp.bound else self.ema.bound
        return build_space(exp, self.data, built, self.ema.sde, self.registry).to(self.device), spec, built

    def estimators(self, which: str, time_sampler: str | None = None, samples: int | None = None) -> dict:
        """The estimators named in ``which`` (comma-separated), each with its ``settings``."""
        cfg = self.exp.eval
        ts = self.parts.eval_time_sampler
        if time_sampler:
            ts = self.registry.get("time_sampler", time_sampler, where="--time-sampler").factory()
        try:
            return make_estimators(which, cfg, ts, samples=samples, time_sampler_name=time_sampler or cfg.time_sampler,
                                   registry=self.registry,
                                   sde=self.ema.sde)
        except InvalidArgument as e:
            key = "--estimator" if e.argument == "estimator" else f"eval.{e.argument}"
            raise ConfigError(f"{self.exp.source}: {key}: {e.message}") from None

    def sampler(self, lam: float | None = None, name: str | None = None):
        """The experiment's sampler (or the registered sampler ``name`` with its defaults), with λ
        replaced when given (the sampler must take ``lam``)."""
        spec = dict(self.exp.components["sampler"]) if name is None else {"name": name}
        if lam is not None:
            if name is None:
                require_lambda_sampler(self.registry, self.exp, "--lam")
            spec["lam"] = lam
        checked = check_component(self.registry, "sampler", spec, f"{self.run_dir}/{CONFIG_FILE}"
                                  if name is None else "sampler")
        exp = attrs.evolve(self.exp, components={**self.exp.components, "sampler": checked})
        return build_component(self.registry, exp, "sampler")

    @torch.no_grad()
    def draw(self, sampler, num: int, *, steps: int | None = None, seed: int = 0, trajectory: bool = False):
        """Samples in data space (and, with ``trajectory``, every state of the sampler in model space)."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        x_T = self.ema.prior_sample((num, *self.data.shape), generator=generator, device=self.device)
        ts = sampler.time_grid(self.ema.sde, steps)
        self.ema.eval()
        if trajectory:
            z, states = sampler.trajectory(self.ema, x_T, ts, generator=generator)
            return self.ema_objective.space.inverse(z), states
        return self.ema_objective.space.inverse(sampler.sample(self.ema, x_T, ts, generator=generator)), None

    def save_samples(self, path: Path | None, *, num: int, lam: float | None = None, sampler: str | None = None,
                     steps: int | None = None, seed: int = 0) -> Path:
        """A picture of ``num`` samples at ``path`` (None: the run's samples/sample.png, wherever the
        folder is once they are drawn)."""
        sampler = self.sampler(lam, sampler)
        x, _ = self.draw(sampler, num, steps=steps, seed=seed)
        used = getattr(sampler, "lam", None)
        path = path or self.records_dir() / SAMPLES_DIR / "sample.png"
        return save_samples(x, self.data.kind, path, title="samples" if used is None else f"samples (λ = {used:g})")

    def save_trajectories(self, path: Path | None, *, num: int, steps: int | None = None, seed: int = 0) -> Path:
        """Both λ-samplers' paths at ``path`` (None: the run's samples/trajectories.png)."""
        paths = {}
        for lam in (0.0, 1.0):
            _, states = self.draw(self.sampler(lam), num, steps=steps, seed=seed, trajectory=True)
            paths[f"λ = {lam:g}" + (" (reverse SDE)" if lam == 0 else " (probability-flow ODE)")] = states
        return save_trajectories(paths, path or self.records_dir() / SAMPLES_DIR / "trajectories.png")


def build_run(exp: Experiment, run_dir: str | Path, *, registry: Registry | None = None,
              ctx: DistContext | None = None) -> Run:
    """Check, load data and build the model (seeded), without touching the run folder."""
    registry = registry or default_registry()
    parts = check_experiment(exp, registry)
    device = ctx.device if ctx else resolve_device(exp.device, exp.source)
    data = build_data(exp, registry)
    torch.manual_seed(exp.seed)  # identical initial weights on every rank and every restart
    model = build_model(exp, parts.sde, data.shape, registry)
    model.bound = build_bound(exp, data)
    space = build_space(exp, data, model.bound, model.sde, registry)
    check_trainable(exp, {"sde": model.sde, "parameterization": model.parameterization, "network": model.network,
                          "loss": parts.loss, "time_sampler": parts.time_sampler, "dequantizer": space.dequantizer})
    objective = Objective(model, parts.loss, parts.time_sampler, space).to(device)
    ema_objective = copy.deepcopy(objective).requires_grad_(False)
    return Run(exp, Path(run_dir), parts, data, model, ema_objective.model, device, registry,
               ctx or DistContext(device=device), objective=objective, ema_objective=ema_objective)


def open_run(run_dir: str | Path, registry: Registry | None = None, notice: Callable[[str], None] | None = None
             ) -> Run:
    """A trained run, rebuilt from its config.yaml, with weights (EMA) from its newest usable checkpoint."""
    registry = registry or default_registry()
    exp = run_experiment(run_dir, registry, notice or say)  # a missing or damaged folder is one line
    folder = PinnedFolder(run_dir)  # from now on, the weights and records are this folder's
    run = build_run(exp, run_dir, registry=registry)
    run.folder = folder

    def apply(state: dict[str, Any]) -> None:
        run.model.load_state_dict(state["model"])
        run.ema.load_state_dict(state["ema"])
        run.objective.load_component_state(state.get("components", {}))
        run.ema_objective.load_component_state(state.get("ema_components", {}))
        run.step = int(state["step"])

    if restore(folder.now(), apply, notice or say) is None:
        raise UnreadableCheckpoint(f"{run.run_dir / LAST}: no checkpoint there (has the run saved one yet?)")
    return run


